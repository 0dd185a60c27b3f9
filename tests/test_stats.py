import numpy as np
import pytest
import torch

from susc_core.stats.accumulator import add_draw, init_accumulator, to_chain_stats
from susc_core.stats.estimators import per_token_chi
from susc_core.stats.chain_stats import concat_tokens, from_draws, merge, pool


def _draws(seed, n=12, t=5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=n), rng.normal(size=(n, t))


def test_merge_of_blocks_equals_one_pass_in_any_order():
    g, a = _draws(0)
    whole = from_draws(g, a, 3.0, np.zeros(5))
    cuts = [0, 3, 7, 12]
    blocks = [from_draws(g[i:j], a[i:j], 3.0, np.zeros(5), first_draw=i) for i, j in zip(cuts, cuts[1:])]
    b0, b1, b2 = blocks
    for m in (merge(merge(b0, b1), b2), merge(b0, merge(b1, b2)), merge(merge(b1, b0), b2), merge(b2, merge(b1, b0)),
              merge(merge(b2, b1), b0)):
        assert m.count == 12 and m.first_draw == 0
        np.testing.assert_allclose(m.sum_ga, whole.sum_ga, rtol=1e-13)
        np.testing.assert_allclose([m.sum_g, m.sum_g2], [whole.sum_g, whole.sum_g2], rtol=1e-13)
        np.testing.assert_array_equal(m.g_trace, g)


def test_merge_rejects_gaps_and_other_references():
    g, a = _draws(1)
    x = from_draws(g[:3], a[:3], 3.0, np.zeros(5))
    with pytest.raises(ValueError, match="not consecutive"):
        merge(x, from_draws(g[4:], a[4:], 3.0, np.zeros(5), first_draw=4))
    with pytest.raises(ValueError, match="different w"):
        merge(x, from_draws(g[3:], a[3:], 3.5, np.zeros(5), first_draw=3))


def test_token_shards_concatenate():
    g, a = _draws(2)
    whole = from_draws(g, a, 1.0, np.arange(5.0))
    shards = concat_tokens(from_draws(g, a[:, :2], 1.0, np.arange(2.0)), from_draws(g, a[:, 2:], 1.0, np.arange(2.0, 5.0)))
    for field in ("sum_a", "sum_ga", "sum_a2", "a_star"):
        np.testing.assert_array_equal(getattr(shards, field), getattr(whole, field))


def test_device_accumulator_matches_numpy(device):
    g, a = _draws(3, n=6, t=4)
    acc = init_accumulator(1, 4, 6, device)
    for d in range(6):
        add_draw(acc, d, torch.tensor([g[d]], device=device), torch.tensor(a[d:d + 1], device=device))
    got, want = to_chain_stats(acc, 2.0, np.zeros(4))[0], from_draws(g, a, 2.0, np.zeros(4))
    np.testing.assert_allclose(got.sum_ga, want.sum_ga, rtol=1e-12)
    np.testing.assert_allclose(got.sum_a2, want.sum_a2, rtol=1e-12)
    assert got.count == 6 and got.diverged_step == -1


def test_isserlis_through_the_reducer():
    rng = np.random.default_rng(4)
    l = rng.normal(size=(3, 3))
    sigma = l @ l.T / 3 + np.eye(3) * 0.5
    a_mat = np.diag([1.0, 2.0, 0.5])
    b_mats = [np.array([[1.0, 0.5, 0], [0.5, -1.0, 0.2], [0, 0.2, 2.0]]), np.eye(3)]
    b_vec = np.array([1.0, -2.0, 0.5])
    chains = []
    for _ in range(8):
        w = rng.multivariate_normal(np.zeros(3), sigma, size=20000)
        g = 0.5 * np.einsum("ni,ij,nj->n", w, a_mat, w)
        obs = [0.5 * np.einsum("ni,ij,nj->n", w, b, w) for b in b_mats] + [w @ b_vec]
        chains.append(from_draws(g, np.stack(obs, axis=1), 0.0, np.zeros(3)))
    est = per_token_chi(chains, chains)  # = -Cov[g, A_t]
    want = [-0.5 * np.trace(a_mat @ sigma @ b @ sigma) for b in b_mats] + [0.0]
    assert np.all(np.abs(est.value - want) < 4 * est.se), (est, want)
    assert abs(want[0]) > 10 * est.se[0]  # the test resolves the effect
    assert pool(chains).count == 160000
