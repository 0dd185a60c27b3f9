"""Chains that do not sample the local posterior are caught: the trace checks, the policy on flagged chains,
and the curvature pre-flight of a real study (the audit's step_size=10, gamma=0 case)."""

from __future__ import annotations

import numpy as np
import pytest

from susc_core.stats.chain_stats import from_draws
from susc_core.stats.diagnostics import drift_z, llc_outliers
from susc_core.stats.estimators import per_token_chi
from workflows import screening
from workflows.study_config import DiagnosticsSection
from susc_core.engine.sgld import SamplerConfig

SAMPLER = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=4, n_draws=40)


def test_llc_outliers_flag_a_chain_far_from_its_siblings():
    assert llc_outliers([29.0, 31.0, 32.0, 227.0], 2.0, 1.0).tolist() == [False, False, False, True]
    assert not llc_outliers([0.5, 1.2, 2.0, 0.8], 2.0, 1.0).any()  # small LLCs: the floor keeps them
    assert not llc_outliers([50.0], 2.0, 1.0).any()


def _ar1(n: int, rng, ramp: float = 0.0) -> np.ndarray:
    x = np.zeros(n)
    for t in range(1, n):
        x[t] = 0.7 * x[t - 1] + rng.normal()
    return x + ramp * np.arange(n) / n


def test_drift_z_separates_a_stationary_trace_from_a_drifting_one():
    rng = np.random.default_rng(0)
    stationary = [drift_z(_ar1(100, rng)) for _ in range(300)]
    assert max(stationary) < 10.0 and np.median(stationary) < 2.0
    assert np.median([drift_z(_ar1(100, rng, ramp=20.0)) for _ in range(20)]) > 10.0
    assert np.isnan(drift_z(np.ones(100))) and np.isnan(drift_z(_ar1(30, rng), min_draws=64))


def _chains(llcs: list[float], rng) -> list:
    """Chains of 40 draws whose mean g gives each LLC (nβ = 30), a_t = 0.3 g + noise on 3 tokens."""
    out = []
    for llc in llcs:
        g = llc / 30 + 0.01 * rng.normal(size=40)
        out.append(from_draws(g, 0.3 * g[:, None] + rng.normal(size=(40, 3)), 4.0, np.zeros(3)))
    return out


def test_flagged_chains_fail_the_study_or_are_left_out():
    rng = np.random.default_rng(1)
    stats = {"full": _chains([29.0, 31.0, 32.0, 227.0], rng), "L0H0": _chains([2.0, 2.2, 1.9, 2.1], rng)}
    chains = {comp: list(range(4)) for comp in stats}
    result = screening.screen(stats, {"full": 0.5, "L0H0": 0.4}, SAMPLER, DiagnosticsSection())
    assert [row["excluded"] for row in result.flags["full"]] == [False, False, False, True]
    assert result.flags["full"][3]["llc_outlier"] and not any(r["excluded"] for r in result.flags["L0H0"])
    with pytest.raises(RuntimeError, match=r"\('full', 3\): \['llc_outlier'\]"):
        screening.enforce(result, chains, "fail")
    screening.enforce(result, chains, "drop")
    with pytest.warns(RuntimeWarning, match="dropping 1 diverged"):  # the estimators leave the chain out
        chi = per_token_chi(result.stats["L0H0"], result.stats["full"])
    np.testing.assert_allclose(chi.value, per_token_chi(stats["L0H0"], stats["full"][:3]).value)
    unstable = screening.screen(stats, {"full": 0.5, "L0H0": 3.0}, SAMPLER, DiagnosticsSection())
    assert all(row["unstable"] and row["excluded"] for row in unstable.flags["L0H0"])


def test_preflight_names_the_unstable_components_and_the_step_that_passes():
    wild = SamplerConfig(step_size=10.0, nbeta=30.0, gamma=0.0)
    with pytest.raises(RuntimeError, match=r"unstable for 1 of 2 component\(s\), ε\(nβλ \+ γ\) = L0H0 300.*"
                                           r"step_size <= 0.0667 "):
        screening.check_preflight({"L0H0": 1.0, "L0H1": 0.001}, wild, DiagnosticsSection())
    calm = screening.check_preflight({"L0H0": 1.0}, SAMPLER, DiagnosticsSection())
    assert calm == {"L0H0": pytest.approx(1e-3 * (30 + 300))}
