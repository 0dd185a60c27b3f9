"""SCIENCE.md §7 oracles through the SGLD kernel, the streaming statistics and the estimators."""

import numpy as np
import pytest
import torch

from susc_core.engine import sgld
from susc_core.stats.estimators import llc, per_token_chi
from susc_core.stats.chain_stats import from_draws


def _run(grad_fn, dim, n_chains, step_size, nbeta, gamma, burn_in, n_draws, thin, observe, device, seed=0):
    """Vectorised toy chains from w* = 0 on ``device``; returns per-draw observe(w) as [draws, chains, ...]."""
    gen = torch.Generator(device).manual_seed(seed)
    w_star = torch.zeros(dim, dtype=torch.float64, device=device)
    state = sgld.init(w_star, n_chains)
    fn = lambda w, batch: (None, grad_fn(w))  # noqa: E731
    out = []
    for t in range(burn_in + n_draws * thin):
        state, _ = sgld.step(gen, state, None, fn, w_star, step_size, nbeta, gamma)
        if t >= burn_in and (t - burn_in + 1) % thin == 0:
            out.append(observe(state.w))
    return [torch.stack(o).cpu().numpy() for o in zip(*out)]


def test_zero_noise_and_zero_gradient_do_not_move():
    w = torch.randn(3, 5)
    assert torch.equal(sgld.sgld_update(w, torch.zeros_like(w), w, torch.zeros_like(w), 1e-3, 30.0, 300.0), w)


def test_same_seed_same_noise():
    a = sgld.draw_noise([torch.Generator().manual_seed(s) for s in (1, 2)], (2, 4), "cpu")
    b = sgld.draw_noise([torch.Generator().manual_seed(s) for s in (1, 2)], (2, 4), "cpu")
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_monomial_llc_within_three_standard_errors(device):
    p = torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64, device=device)
    potential = lambda w: 0.5 * (w.abs() ** p).sum(-1)  # noqa: E731
    grad = lambda w: 0.5 * p * w.abs() ** (p - 1) * w.sign()  # noqa: E731
    nbeta = 2.0
    (k,) = _run(grad, 3, 1000, 5e-3, nbeta, 0.0, 1500, 60, 25, lambda w: (potential(w),), device)
    chains = [from_draws(k[:, c], np.zeros((len(k), 1)), 0.0, np.zeros(1)) for c in range(k.shape[1])]
    est = llc(chains, nbeta)
    assert abs(est.value - (1 / 2 + 1 / 4 + 1 / 6)) < 3 * est.se
    assert est.se < 0.02  # resolves the 1/p terms


def test_quadratic_variance_inflation(device):
    kappa, step_size = 300.0, 1e-2  # eps * kappa = 3: inflation 1 / (1 - 3/4) = 4
    (w,) = _run(lambda w: kappa * w, 1, 4000, step_size, 1.0, 0.0, 50, 20, 3, lambda w: (w[:, 0],), device)
    var = w.var()
    want = 1 / (kappa * (1 - step_size * kappa / 4))
    assert abs(var / want - 1) < 0.03
    assert var > 3 * (1 / kappa)  # far from the uninflated value


def test_cubic_covariance(device):
    lam, alpha, t = 1.0, 1.0, 100.0
    (w,) = _run(lambda w: lam * w + alpha / 2 * w ** 2, 1, 4000, 2e-4, t, 0.0, 500, 60, 50, lambda w: (w[:, 0],), device)
    chains = [from_draws(w[:, c] ** 2, w[:, c:c + 1], 0.0, np.zeros(1)) for c in range(w.shape[1])]
    est = per_token_chi(chains, chains)  # -Cov[w², w]
    want = -2 * alpha / (lam ** 3 * t ** 2)
    assert abs(-est.value[0] - want) < 3 * est.se[0] + 0.1 * abs(want), (est, want)
    assert abs(want) > 5 * est.se[0]


@pytest.mark.parametrize("field,value", [("step_size", 0.0), ("nbeta", -1.0), ("divergence_policy", "ignore"),
                                         ("forward_dtype", "float16"), ("gamma", 5000.0)])
def test_sampler_config_rejects_bad_values(field, value):
    kwargs = {"step_size": 1e-3, "nbeta": 30.0, "gamma": 300.0, field: value}
    with pytest.raises(ValueError, match=field if field != "gamma" else "step_size \\* gamma"):
        sgld.SamplerConfig(**kwargs)


def test_sampler_config_requires_step_size_and_nbeta():
    with pytest.raises(TypeError):
        sgld.SamplerConfig(gamma=300.0)  # type: ignore[call-arg]
