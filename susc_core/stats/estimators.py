"""Estimators from merged statistics (SCIENCE.md §2): per-token χ̂, dataset-level χ, LLCs, errors.

With means pooled over the chains x draws of a run (diverged chains dropped, with a warning),

    chi_hat^C_t = -( mean_C[g a_t] - mean_C[g] * mean_full[a_t] )

where a_t = A_t - A*_t; the w* shift cancels exactly, so this is the formula of SCIENCE.md §2.
Without a full run (a study with ``components.include_full=false``, for models whose unrestricted
run is too costly) the component's own chains are passed as ``full``: χ̂ = -Cov_C[g, a_t], the
covariance under the weight-restricted posterior. That is a different estimator (it drops the
term mean_C[g]·(mean_full[a_t] - mean_C[a_t]) that the full run adds); compare it only with itself.
Standard errors are across chains, by the delta method on the pooled means: χ̂ is linearised in each
chain's means, and the spread of those linear terms / sqrt(chains) is the SE. When the centring run is
a separate run (the full run), its chains' spread of mean_full[a_t] (times mean_C[g]) adds in
quadrature: leaving it out underestimates the SE (``benchmarks/chain_independence.py`` measures by how
much against independent repeats).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Sequence

import numpy as np

from susc_core.stats.diagnostics import ess, g_traces, split_rhat
from susc_core.stats.chain_stats import ChainStats, pool


class Estimate(NamedTuple):
    """A pooled value and its standard error across chains (NaN with fewer than 2 chains)."""

    value: np.ndarray | float
    se: np.ndarray | float


def _kept(chains: Sequence[ChainStats]) -> list[ChainStats]:
    kept = [c for c in chains if not c.diverged]
    if len(kept) < len(chains):
        warnings.warn(f"dropping {len(chains) - len(kept)} diverged chain(s) of {len(chains)}", RuntimeWarning,
                      stacklevel=3)
    return kept


def _se(per_chain: list) -> np.ndarray | float:
    values = np.asarray(per_chain, np.float64)
    return values.std(axis=0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.full(values.shape[1:], np.nan)


def per_token_chi(comp: Sequence[ChainStats], full: Sequence[ChainStats]) -> Estimate:
    """χ̂^C_t for every probe token t: [T] value and standard error (across chains, delta method).

    full: the chains whose mean of a_t centres the estimate (the unrestricted run; ``comp`` itself for
    the restricted covariance -Cov_C[g, a_t])."""
    return _centred_estimate(comp, full, lambda a: a)


def _centred_estimate(comp: Sequence[ChainStats], full: Sequence[ChainStats], project) -> Estimate:
    """χ̂ = -(m_ga - m_g · m_fa) of the projected token sums (``project``: [T] -> [T] or a scalar) and its SE.

    Delta method: the component's chains contribute ψ_c = -(m_ga,c - m_g,c · m_fa) (and, when ``full`` is
    the same chains, + m_g · m_a,c); a separate centring run contributes m_g · m_fa,f over its chains f, in
    quadrature (the two runs' chains are independent)."""
    comp, full = _kept(comp), _kept(full)
    pc, pf = pool(comp), pool(full)
    m_g, full_sum_a = pc.sum_g / pc.count, project(pf.sum_a)

    def chi(s) -> np.ndarray | float:  # centred on the pooled centring run
        return chi_from_sums(project(s.sum_ga), s.sum_g, s.count, full_sum_a, pf.count)

    value, psi = chi(pc), [chi(c) for c in comp]
    if {id(c) for c in comp} == {id(c) for c in full}:
        return Estimate(value, _se([p + m_g * project(c.sum_a) / c.count for p, c in zip(psi, comp)]))
    centring = [m_g * project(c.sum_a) / c.count for c in full]
    return Estimate(value, np.sqrt(_se(psi) ** 2 + _se(centring) ** 2))


def chi_from_sums(sum_ga: np.ndarray, sum_g: float, count: int, full_sum_a: np.ndarray,
                  full_count: int) -> np.ndarray:
    """χ̂_t = -( mean_C[g a_t] - mean_C[g] · mean_full[a_t] ) from sums over some draws of the component
    (sum_ga [T], sum_g, count) and of the centring run (full_sum_a [T], full_count): the formula of
    SCIENCE.md §2 on any set of chains, e.g. a bootstrap resample of them (sums of the resampled chains)."""
    return -(sum_ga / count - (sum_g / count) * (full_sum_a / full_count))


def probe_means(values: np.ndarray, token_probe: np.ndarray, n_probes: int) -> np.ndarray:
    """Mean of per-token values [T] over each probe's tokens (token_probe [T] ints) -> [n_probes]."""
    counts = np.bincount(token_probe, minlength=n_probes)
    if np.any(counts == 0):
        raise ValueError(f"probes {np.flatnonzero(counts == 0).tolist()} have no tokens")
    return np.bincount(token_probe, weights=values, minlength=n_probes) / counts


def mixture_chi(comp: Sequence[ChainStats], full: Sequence[ChainStats], token_weights: np.ndarray,
                delta_h: float) -> Estimate:
    """χ̂ of the mixture q_h = (1 - δh) q + δh q' whose probe q' weighs tokens by token_weights [T] (sum 1).

    ΔL_h = δh * Σ_t w_t A_t, so the estimate is -Cov[g, ΔL_h] computed from the sums; it estimates
    δh·χ (the paper's check: slope 1/δh against the token mean). full: as in ``per_token_chi``.
    """
    w = np.asarray(token_weights, np.float64)
    if not np.isclose(w.sum(), 1.0):
        raise ValueError(f"token_weights must sum to 1, got {w.sum()}")
    estimate = _centred_estimate(comp, full, lambda a: delta_h * (a @ w))
    return Estimate(float(estimate.value), float(estimate.se))


def llc(chains: Sequence[ChainStats], nbeta: float) -> Estimate:
    """LLC nβ·(mean L_n - L_n(w*)) = nβ·mean g: the ordinary LLC on the full run, weight-refined on C."""
    chains = _kept(chains)
    p = pool(chains)
    return Estimate(nbeta * p.sum_g / p.count, float(_se([[nbeta * c.sum_g / c.count] for c in chains])[0]))


def mean_loss(chains: Sequence[ChainStats]) -> float:
    """mean L_n over the draws of the non-diverged chains (nats)."""
    chains = _kept(chains)
    p = pool(chains)
    return chains[0].loss_star + p.sum_g / p.count


class Convergence(NamedTuple):
    rhat: float
    ess: float


def convergence(chains: Sequence[ChainStats]) -> Convergence:
    """Split-R-hat and ESS of g over a component's non-diverged chains."""
    traces = g_traces(chains)
    return Convergence(split_rhat(traces), ess(traces))
