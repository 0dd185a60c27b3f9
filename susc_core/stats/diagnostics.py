"""Chain diagnostics of the g trace: split-R-hat, effective sample size, divergence summary.

Formulas follow Gelman et al. (BDA3 §11.4-11.5) and Stan: split each chain in halves; ESS uses the
chains' pooled autocorrelation with Geyer's initial monotone positive-pair truncation.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from susc_core.stats.chain_stats import ChainStats

MIN_DRAWS = 4  # split-R-hat and ESS split each chain in halves of at least 2 draws


def _split(traces: np.ndarray) -> np.ndarray:
    traces = np.asarray(traces, np.float64)
    if traces.ndim != 2 or traces.shape[1] < MIN_DRAWS:
        raise ValueError(f"traces must be [chains, draws] with at least {MIN_DRAWS} draws, got shape {traces.shape}")
    half = traces.shape[1] // 2
    return np.concatenate([traces[:, :half], traces[:, -half:]])


def split_rhat(traces: np.ndarray) -> float:
    """Split-R-hat of traces [chains, draws] (1 when the halves of all chains agree)."""
    x = _split(traces)
    n = x.shape[1]
    within = x.var(axis=1, ddof=1).mean()
    between = n * x.mean(axis=1).var(ddof=1)
    return float(np.sqrt(((n - 1) / n * within + between / n) / within))


def ess(traces: np.ndarray) -> float:
    """Effective sample size of traces [chains, draws] (at most chains * draws for independent draws)."""
    x = _split(traces)
    m, n = x.shape
    centred = x - x.mean(axis=1, keepdims=True)
    size = 2 ** int(np.ceil(np.log2(2 * n)))
    spectrum = np.fft.rfft(centred, n=size, axis=1)
    acov = np.fft.irfft(spectrum * np.conj(spectrum), n=size, axis=1)[:, :n] / n  # [m, n]
    within = acov[:, 0].mean() * n / (n - 1)
    var_plus = within * (n - 1) / n + (x.mean(axis=1).var(ddof=1) if m > 1 else 0.0)
    rho = 1 - (within - acov.mean(axis=0)) / var_plus  # [n]
    rho[0] = 1.0
    pairs = rho[: n - n % 2].reshape(-1, 2).sum(axis=1)
    positive = np.argmax(pairs <= 0) if np.any(pairs <= 0) else len(pairs)
    pairs = np.minimum.accumulate(pairs[:positive])
    tau = -1 + 2 * pairs.sum()
    return float(m * n / max(tau, 1.0 / np.log10(m * n)))


def divergences(stats: Mapping[tuple[str, int], ChainStats]) -> dict[tuple[str, int], int]:
    """{(component, chain): first bad step} for every diverged chain."""
    return {key: s.diverged_step for key, s in stats.items() if s.diverged}


def g_traces(chains: Sequence[ChainStats]) -> np.ndarray:
    """Stack the g traces of a component's non-diverged chains: [chains, draws]."""
    return np.stack([c.g_trace for c in chains if not c.diverged])


def enforce_divergence_policy(stats: Mapping[tuple[str, int], ChainStats], policy: str) -> None:
    """Policy "fail": raise naming every diverged (component, chain) and its first bad step; "drop":
    warn (the estimators then leave those chains out). Never averaged in silently."""
    diverged = divergences(stats)
    if not diverged:
        return
    message = (f"{len(diverged)} chain(s) diverged (component, chain): first bad step = {diverged}; "
               f"lower step_size or nbeta, or raise gamma")
    if policy == "fail":
        raise RuntimeError(message)
    warnings.warn(message + "; they are flagged and the estimators drop them", RuntimeWarning, stacklevel=3)
