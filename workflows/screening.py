"""Chains that are not sampling the local posterior, and what ``sampler.divergence_policy`` does with them.

Three signs besides a blow-up (which the engine flags as it runs): the curvature pre-flight (ε(nβλ + γ) of a
component above ``diagnostics.max_stability``: its linearised SGLD barely contracts, SCIENCE.md §3), a g
trace that still drifts (``drift_z``), and an LLC far from its sibling chains' (``llc_outliers``). Under
"fail" the study stops with every flagged (component, chain) named (finished units stay cached); under
"drop" the flagged chains are marked excluded (``EXCLUDED_STEP``) so every estimator leaves them out, and
``diagnostics.parquet`` and the report show why.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from susc_core.engine.sgld import SamplerConfig
from susc_core.engine.stability import stability_number
from susc_core.stats.chain_stats import ChainStats
from susc_core.stats.diagnostics import trace_flags
from workflows.runtime import get_logger
from workflows.study_config import DiagnosticsSection

log = get_logger("screening")
EXCLUDED_STEP = 0  # diverged_step of a chain left out by a diagnostic (a blow-up is at step >= 1)
REASONS = ("unstable", "nonstationary", "llc_outlier")


def check_preflight(curvature: dict[str, float], sampler: SamplerConfig, rules: DiagnosticsSection) -> dict[str, float]:
    """{component: ε(nβλ + γ)} from the pre-flight's top eigenvalues λ; raises under policy "fail" when one is
    above ``rules.max_stability`` (naming them and the largest step size that passes), warns under "drop"."""
    numbers = {name: stability_number(value, sampler.nbeta, sampler.gamma, sampler.step_size)
               for name, value in curvature.items()}
    unstable = sorted(((x, name) for name, x in numbers.items() if x > rules.max_stability), reverse=True)
    if unstable:
        passing = min(rules.max_stability / (sampler.nbeta * abs(v) + sampler.gamma) for v in curvature.values())
        message = (f"curvature pre-flight: SGLD is unstable for {len(unstable)} of {len(numbers)} component(s), "
                   f"ε(nβλ + γ) = " + ", ".join(f"{name} {x:.3g}" for x, name in unstable[:8])
                   + f" above diagnostics.max_stability={rules.max_stability} (the linearised chain stops "
                   f"contracting at 4); sampler.step_size <= {passing:.3g} passes for every component")
        if sampler.divergence_policy == "fail":
            raise RuntimeError(message + " (sampler.divergence_policy=drop runs them and leaves them out)")
        log.warning("%s; divergence_policy=drop: their chains run and are left out of every estimate", message)
    return numbers


class Screening(NamedTuple):
    """stats: the chains, flagged ones marked excluded; flags: per component, per chain, the diagnostics
    (stability, unstable, drift_z, nonstationary, llc_outlier, excluded)."""

    stats: dict[str, list[ChainStats]]
    flags: dict[str, list[dict]]


def screen(stats: dict[str, list[ChainStats]], stability: dict[str, float], sampler: SamplerConfig,
           rules: DiagnosticsSection) -> Screening:
    """Flag every chain of ``stats`` (component -> chains) by the pre-flight ``stability`` and the trace checks."""
    kept, flags = {}, {}
    for comp, chains in stats.items():
        x = stability.get(comp, math.nan)
        rows = [f | {"stability": x, "unstable": bool(x > rules.max_stability)}
                for f in trace_flags(chains, sampler.nbeta, rules.llc_outlier_rel, rules.llc_outlier_abs,
                                     rules.max_drift_z, rules.min_drift_draws)]
        for row, chain in zip(rows, chains):
            row["excluded"] = not chain.diverged and any(row[r] for r in REASONS)
        flags[comp] = rows
        kept[comp] = [c._replace(diverged_step=EXCLUDED_STEP) if r["excluded"] else c for c, r in zip(chains, rows)]
    return Screening(kept, flags)


def enforce(screening: Screening, chains: dict[str, list[int]], policy: str) -> None:
    """Policy "fail": raise naming every flagged (component, chain) and why; "drop": warn (they are excluded)."""
    flagged = {(comp, chains[comp][i]): [r for r in REASONS if row[r]]
               for comp, rows in screening.flags.items() for i, row in enumerate(rows) if row["excluded"]}
    if not flagged:
        return
    message = (f"{len(flagged)} chain(s) are not sampling the local posterior ((component, chain): reasons, see "
               f"diagnostics.parquet): {flagged}; lower sampler.step_size, or raise sampler.gamma or sampler.burn_in")
    if policy == "fail":
        raise RuntimeError(message + "; finished units stay cached (sampler.divergence_policy=drop leaves these "
                                     "chains out instead)")
    log.warning("%s; divergence_policy=drop: they are left out of every estimate", message)
