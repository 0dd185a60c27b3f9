"""An analytic oracle through the production loop (``chains.sample_chains`` -> ``sgld.step`` -> accumulator ->
``estimators.per_token_chi``), with the localisation on (γ > 0) and component chains that differ from the full
run's.

The "model" is quadratic: token x costs l_x(w) = u_x·w + ½ wᵀ H_x w on three coordinates, w* = 0. Training and
observable contexts hold token 0 only (u_0 = 0, H_0 = H), so every minibatch loss is exactly ½ wᵀ H w (one
shared minibatch stream is then as good as any) and SGLD is linear: w' = (I - εA/2) w + √ε ξ with A = nβ H_CC + γ I on the moving coordinates C. Its stationary law is
N(0, Σ_C) with Σ_C = A⁻¹ (I - εA/4)⁻¹ (exact for any ε). With D_t = H_t - H for probe token t,

    g = ½ wᵀ H w,  a_t = (l_t(w) - L_n(w)) - (l_t(0) - L_n(0)) = u_t·w + ½ wᵀ D_t w,
    χ_t = -( E_C[g a_t] - E_C[g] E_F[a_t] )
        = -( ½ tr(H Σ_C D_t Σ_C) + ¼ tr(H Σ_C) (tr(D_t Σ_C) - tr(D_t Σ_F)) )

(Gaussian moments: Cov(wᵀPw, wᵀQw) = 2 tr(PΣQΣ); odd moments vanish). Each wrong engine of the design
review lands many standard errors away, checked below on the exact values: the observable without the
L_n(draw) subtraction (a_t = l_t(w) - l_t(0)), the localisation term with the wrong sign or scale, and
the component's and the full run's means swapped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from susc_core.engine.inputs import UnitContexts
from susc_core.engine.chains import reference_values, sample_chains
from susc_core.engine.seeds import chain_streams
from susc_core.engine.sgld import SamplerConfig
from susc_core.engine.stability import top_curvature
from susc_core.stats.accumulator import to_chain_stats
from susc_core.stats.estimators import per_token_chi

DIM, COMPONENT = 3, [0, 1]
H = np.array([[1.0, 0.3, 0.2], [0.3, 2.0, -0.4], [0.2, -0.4, 1.5]])
SAMPLER = SamplerConfig(step_size=0.01, nbeta=10.0, gamma=20.0, n_chains=1000, burn_in=300, n_draws=100,
                        steps_between_draws=5, batch_size=2, chains_per_pass=1000, share_minibatches=True)


def _probe_terms(n_probe: int) -> tuple[np.ndarray, np.ndarray]:
    """u [n_probe, DIM] and H_t [n_probe, DIM, DIM]: H scaled by 1 + s_t (|s_t| in [0.5, 2], either sign)
    plus a symmetric perturbation, so that a_t correlates with g and every token's χ is resolved."""
    rng = np.random.default_rng(0)
    u = 0.3 * rng.normal(size=(n_probe, DIM))
    m = rng.normal(size=(n_probe, DIM, DIM))
    scale = rng.uniform(0.5, 2.0, n_probe) * np.where(np.arange(n_probe) % 2, 1.0, -1.0)
    return u, H * (1 + scale[:, None, None]) + 0.3 * (m + m.transpose(0, 2, 1))


class QuadraticGroup:
    """The ``chains.Group`` of the quadratic model for chains moving the coordinates ``coords``."""

    def __init__(self, coords: list[int], u: np.ndarray, h: np.ndarray):
        self.coords = coords
        self.u = torch.tensor(np.concatenate([np.zeros((1, DIM)), u]), dtype=torch.float32)  # [V, DIM]
        self.h = torch.tensor(np.concatenate([H[None], h]), dtype=torch.float32)  # [V, DIM, DIM]

    def prepare(self, tokens):
        return tokens

    def losses(self, w, rows, cache, mean=False):
        x = cache[:, :, 1:]  # predicted tokens [G, B, S]
        x = x if len(x) == 1 else x[rows.tokens]  # [1 or k, B, S]
        full = w.new_zeros(len(w), DIM)
        full[:, self.coords] = w
        full = full[:, None, None, :]  # [k, 1, 1, DIM]
        quadratic = ((self.h[x] @ full[..., None])[..., 0] * full).sum(-1)
        loss = (self.u[x] * full).sum(-1) + 0.5 * quadratic  # [k, B, S]
        return loss.mean(dim=(1, 2)) if mean else loss


def stationary_cov(coords: list[int], sampler: SamplerConfig, gamma_sign: float = 1.0) -> np.ndarray:
    """Σ of linear SGLD moving ``coords`` (zero rows/columns elsewhere)."""
    a = sampler.nbeta * H[np.ix_(coords, coords)] + gamma_sign * sampler.gamma * np.eye(len(coords))
    sigma = np.zeros((DIM, DIM))
    sigma[np.ix_(coords, coords)] = np.linalg.inv(a @ (np.eye(len(coords)) - sampler.step_size * a / 4))
    return sigma


def exact_chi(sigma_c: np.ndarray, sigma_f: np.ndarray, h_t: np.ndarray, subtract_loss_n: bool = True) -> np.ndarray:
    """χ_t of the module docstring for every probe term H_t [n, DIM, DIM]; without ``subtract_loss_n`` the
    observable is l_t(w) - l_t(0) (D_t replaced by H_t)."""
    d = h_t - H if subtract_loss_n else h_t
    cov = 0.5 * np.einsum("ij,jk,nkl,li->n", H, sigma_c, d, sigma_c)
    shift = 0.25 * np.trace(H @ sigma_c) * (np.einsum("nij,ji->n", d, sigma_c) - np.einsum("nij,ji->n", d, sigma_f))
    return -(cov + shift)


def _run(coords: list[int], u, h, n_probe: int, seed: int):
    """ChainStats of SAMPLER.n_chains chains moving ``coords`` on probe tokens 1..n_probe (one each)."""
    group = QuadraticGroup(coords, u, h)
    train = torch.zeros(8, 2, dtype=torch.long)  # contexts [N, S+1] = [token 0, token 0]
    obs = torch.zeros(2, 2, dtype=torch.long)
    probe = torch.stack([torch.zeros(n_probe, dtype=torch.long), torch.arange(1, n_probe + 1)], dim=1)
    ref = reference_values(lambda t: group.losses(torch.zeros(1, len(coords)), None, t[None])[0], UnitContexts(train, obs, probe), 64)
    members = [("C" + "".join(map(str, coords)), c) for c in range(SAMPLER.n_chains)]
    streams = chain_streams(seed, members, SAMPLER.share_minibatches, len(train), SAMPLER.n_steps,
                            SAMPLER.batch_size, "cpu")
    acc = sample_chains(group, torch.zeros(len(coords)), streams, UnitContexts(train, obs, probe), ref, SAMPLER, 64)
    return to_chain_stats(acc, float(ref.loss_star), ref.a_star.numpy())


@pytest.fixture(scope="module")
def oracle():
    """Per-token χ̂ of the component {0, 1} centred on the full run, with both runs' exact Σ."""
    n_probe = 6
    u, h = _probe_terms(n_probe)
    comp, full = _run(COMPONENT, u, h, n_probe, seed=1), _run(list(range(DIM)), u, h, n_probe, seed=2)
    return per_token_chi(comp, full), h, stationary_cov(COMPONENT, SAMPLER), stationary_cov(list(range(DIM)), SAMPLER)


def test_engine_chi_equals_the_quadratic_oracle(oracle):
    estimate, h, sigma_c, sigma_f = oracle
    want = exact_chi(sigma_c, sigma_f, h)
    assert np.all(np.abs(estimate.value - want) < 4 * estimate.se + 0.02 * np.abs(want)), (estimate, want)
    assert np.all(np.abs(want) > 10 * estimate.se)  # the oracle resolves every token's χ


def _misses(estimate, wrong: np.ndarray) -> bool:
    """Whether the engine's estimate is far (> 8 SE on some token) from a wrong engine's exact value."""
    return bool(np.any(np.abs(estimate.value - wrong) > 8 * estimate.se))


def test_the_oracle_rejects_each_wrong_engine(oracle):
    """The exact value of each wrong engine lies far from the production engine's estimate, so the oracle test
    above fails for it (each wrong engine was also run by hand: see the closing note of issue 18)."""
    estimate, h, sigma_c, sigma_f = oracle
    wrong = {
        "no L_n(draw) subtraction": exact_chi(sigma_c, sigma_f, h, subtract_loss_n=False),
        "localisation sign flipped": exact_chi(stationary_cov(COMPONENT, SAMPLER, -1.0),
                                               stationary_cov(list(range(DIM)), SAMPLER, -1.0), h),
        "localisation scale halved": exact_chi(stationary_cov(COMPONENT, SAMPLER, 0.5),
                                               stationary_cov(list(range(DIM)), SAMPLER, 0.5), h),
        "component and full means swapped": exact_chi(sigma_f, sigma_c, h),
    }
    assert all(_misses(estimate, value) for value in wrong.values()), {k: _misses(estimate, v) for k, v in wrong.items()}


def test_preflight_curvature_is_the_top_eigenvalue_of_the_restricted_hessian():
    """Power iteration on finite-difference Hessian-vector products of the production gradient finds the top
    eigenvalue of H restricted to each group's coordinates (the quadratic's Hessian is exact)."""
    u, h = _probe_terms(2)
    tokens = torch.zeros(1, 3, 2, dtype=torch.long)  # token 0 only: the minibatch loss is ½ wᵀ H w
    for coords in (COMPONENT, list(range(DIM))):
        group = QuadraticGroup(coords, u, h)
        got = top_curvature(group, torch.zeros(1, len(coords)), tokens, 60, 1e-2, torch.Generator().manual_seed(0))
        want = np.linalg.eigvalsh(H[np.ix_(coords, coords)]).max()
        assert float(got[0]) == pytest.approx(want, rel=1e-3)
