import warnings

import numpy as np
import pytest

from susc_core.stats.diagnostics import ess, split_rhat
from susc_core.stats.estimators import convergence, llc, mean_loss, mixture_chi, per_token_chi, probe_means
from susc_core.stats.chain_stats import from_draws

RNG = np.random.default_rng(0)


def _chains(n_chains, n_draws, t, shift=0.0, loss_star=4.0):
    out = []
    for _ in range(n_chains):
        g = RNG.normal(size=n_draws) + shift
        a = RNG.normal(size=(n_draws, t)) + 0.3 * g[:, None]
        out.append(from_draws(g, a, loss_star, np.zeros(t)))
    return out


def test_per_token_chi_matches_the_formula_written_out():
    comp, full = _chains(3, 50, 4), _chains(2, 40, 4)
    g = np.concatenate([c.g_trace for c in comp])
    ga = sum(c.sum_ga for c in comp) / len(g)
    mean_full_a = sum(c.sum_a for c in full) / 80
    want = -(ga - g.mean() * mean_full_a)
    est = per_token_chi(comp, full)
    np.testing.assert_allclose(est.value, want, rtol=1e-12)
    assert np.all(est.value < -0.1)  # a = 0.3 g + noise: positive covariance, negative chi


@pytest.mark.parametrize("same_chains", [False, True])
def test_chi_standard_error_matches_the_spread_over_repeats(same_chains):
    """Over 400 simulated studies (4 component chains, and 4 separate full-run chains or the same ones, 40
    iid draws each, mean g = 2 so the centring's noise matters), the mean reported variance equals the
    variance of χ̂ across the studies. An SE that left out the full run's spread would be about half of it."""
    rng = np.random.default_rng(1)

    def study():
        comp = []
        for _ in range(4):
            g = 2 + rng.normal(size=40)
            comp.append(from_draws(g, rng.normal(size=(40, 3)) + 0.5 * g[:, None], 0.0, np.zeros(3)))
        full = comp if same_chains else [from_draws(rng.normal(size=40), rng.normal(size=(40, 3)), 0.0, np.zeros(3))
                                         for _ in range(4)]
        return per_token_chi(comp, full)

    estimates = [study() for _ in range(400)]
    values, variances = np.stack([e.value for e in estimates]), np.stack([e.se ** 2 for e in estimates])
    ratio = variances.mean(axis=0) / values.var(axis=0, ddof=1)
    assert np.all((ratio > 0.75) & (ratio < 1.33)), ratio


def test_dataset_level_and_mixture():
    comp, full = _chains(4, 30, 6), _chains(4, 30, 6)
    chi = per_token_chi(comp, full).value
    probes = np.array([0, 0, 1, 1, 1, 2])
    means = probe_means(chi, probes, 3)
    np.testing.assert_allclose(means, [chi[:2].mean(), chi[2:5].mean(), chi[5]])
    weights = (probes == 1) / 3.0
    mix = mixture_chi(comp, full, weights, delta_h=0.1)
    np.testing.assert_allclose(mix.value / means[1], 0.1, rtol=1e-10)  # slope 1/δh
    with pytest.raises(ValueError, match="sum to 1"):
        mixture_chi(comp, full, probes.astype(float), 0.1)


def test_llc_and_mean_loss():
    chains = _chains(4, 25, 1, shift=0.5, loss_star=3.0)
    g = np.concatenate([c.g_trace for c in chains])
    est = llc(chains, nbeta=30.0)
    np.testing.assert_allclose(est.value, 30 * g.mean(), rtol=1e-12)
    np.testing.assert_allclose(est.se, np.std([30 * c.g_trace.mean() for c in chains], ddof=1) / 2, rtol=1e-12)
    np.testing.assert_allclose(mean_loss(chains), 3.0 + g.mean(), rtol=1e-12)


def test_diverged_chains_are_dropped_with_a_warning():
    chains = _chains(3, 20, 2)
    bad = chains[1]._replace(diverged_step=7, sum_g=np.nan)
    with pytest.warns(RuntimeWarning, match="dropping 1 diverged"):
        value = llc([chains[0], bad, chains[2]], 1.0).value
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(value, llc([chains[0], chains[2]], 1.0).value)


def test_rhat_and_ess():
    iid = RNG.normal(size=(4, 400))
    assert abs(split_rhat(iid) - 1) < 0.02
    assert 0.7 * 1600 < ess(iid) < 1.3 * 1600
    shifted = iid + np.array([0.0, 0.0, 0.0, 2.0])[:, None]
    assert split_rhat(shifted) > 1.2
    ar = np.zeros((4, 2000))
    for t in range(1, 2000):
        ar[:, t] = 0.9 * ar[:, t - 1] + RNG.normal(size=4)
    assert 0.5 * 8000 * 0.1 / 1.9 < ess(ar) < 2 * 8000 * 0.1 / 1.9  # AR(1): ESS = N (1 - rho) / (1 + rho)
    assert convergence(_chains(4, 40, 1)).rhat < 1.1
