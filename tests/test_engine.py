import numpy as np
import pytest
import torch

from susc_core.components import component, gather
from susc_core.engine import run_unit
from susc_core.fused_nll import fused_nll
from susc_core.groups import HeadGroup
from susc_core.model import ModelConfig, init_params
from susc_core.sgld import SamplerConfig

CFG = ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=16)
CFG_MLP = ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=16, d_mlp=12)
SAMPLER = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=2, n_draws=3, batch_size=4)


def _setup(cfg):
    gen = torch.Generator().manual_seed(0)
    params = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in init_params(cfg, gen).items()}
    contexts = [torch.randint(0, cfg.d_vocab, (n, 9), generator=gen) for n in (30, 4, 3)]
    return params, contexts


def _assert_same(a, b, atol=2e-6):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].g_trace, b[key].g_trace, atol=atol, err_msg=str(key))
        np.testing.assert_allclose(a[key].sum_ga, b[key].sum_ga, atol=atol, err_msg=str(key))
        np.testing.assert_allclose(a[key].sum_a2, b[key].sum_a2, atol=atol, err_msg=str(key))


@pytest.mark.parametrize("cfg,share", [(CFG, True), (CFG, False), (CFG_MLP, True)])
def test_batched_equals_sequential_reference(cfg, share):
    params, (train, obs, probe) = _setup(cfg)
    sampler = SamplerConfig(**{**SAMPLER.__dict__, "share_minibatches": share})
    names = ["L*H*", "L1", "embed", "unembed", "full"] + (["L0.mlp"] if cfg.d_mlp else [])
    batched = run_unit(cfg, params, names, [0, 1], sampler, train, obs, probe, seed=3)
    reference = run_unit(cfg, params, names, [0, 1], sampler, train, obs, probe, seed=3, mode="reference")
    _assert_same(batched, reference)
    assert len(batched) == 2 * (4 + 4 + bool(cfg.d_mlp))
    assert all(np.abs(s.g_trace).max() > 1e-4 for s in batched.values())  # chains moved
    assert batched[("L1H0", 0)].a_star.shape == (3 * 8,)


def test_chain_statistics_do_not_depend_on_grouping():
    params, (train, obs, probe) = _setup(CFG)
    together = run_unit(CFG, params, ["L1H*", "L0H1"], [0, 1, 2], SAMPLER, train, obs, probe, seed=5)
    alone = run_unit(CFG, params, ["L1H1"], [2], SAMPLER, train, obs, probe, seed=5)
    _assert_same({("L1H1", 2): together[("L1H1", 2)]}, alone)
    other_seed = run_unit(CFG, params, ["L1H1"], [2], SAMPLER, train, obs, probe, seed=6)
    assert not np.allclose(other_seed[("L1H1", 2)].g_trace, alone[("L1H1", 2)].g_trace)
    assert not np.allclose(together[("L1H1", 0)].g_trace, together[("L1H1", 1)].g_trace)


def test_divergence_policies():
    params, (train, obs, probe) = _setup(CFG)
    wild = SamplerConfig(**{**SAMPLER.__dict__, "step_size": 0.5, "gamma": 1.0, "nbeta": 1e4, "blowup_nats": 1.0})
    with pytest.raises(RuntimeError, match="diverged"):
        run_unit(CFG, params, ["full"], [0], wild, train, obs, probe, seed=1)
    with pytest.warns(RuntimeWarning, match="diverged"):
        out = run_unit(CFG, params, ["full"], [0], SamplerConfig(**{**wild.__dict__, "divergence_policy": "drop"}),
                       train, obs, probe, seed=1)
    assert out[("full", 0)].diverged and 1 <= out[("full", 0)].diverged_step <= wild.n_steps


def test_bad_inputs_are_named():
    params, (train, obs, probe) = _setup(CFG)
    with pytest.raises(ValueError, match="unknown component 'L5H0'"):
        run_unit(CFG, params, ["L5H0"], [0], SAMPLER, train, obs, probe, seed=1)
    with pytest.raises(ValueError, match="same length"):
        run_unit(CFG, params, ["full"], [0], SAMPLER, train, obs[:, :4], probe, seed=1)
    with pytest.raises(ValueError, match="probe_contexts holds token ids"):
        run_unit(CFG, params, ["full"], [0], SAMPLER, train, obs, probe + 100, seed=1)
    with pytest.raises(ValueError, match="batch_size"):
        run_unit(CFG, params, ["full"], [0], SamplerConfig(**{**SAMPLER.__dict__, "batch_size": 99}),
                 train, obs, probe, seed=1)


def _fused_case(lowrank: bool):
    gen = torch.Generator().manual_seed(7)
    k, n, r, d, v = 3, 11, 4, 5, 9
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    x, beta = rnd(k, n, r).requires_grad_(), rnd(v).requires_grad_()
    if lowrank:
        w, targets = rnd(k, r, v).requires_grad_(), torch.randint(0, v, (1, n), generator=gen)
        scale = (torch.rand(k, n, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
        base, w_base = rnd(1, n, d), rnd(d, v)
        return (x, w, beta, scale), targets, base, w_base
    return (x, rnd(1, r, v).requires_grad_(), beta, None), torch.randint(0, v, (k, n), generator=gen), None, None


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_fused_nll_value_and_gradient_equal_autograd(lowrank, mean):
    """Per-token output: gradients in x (and scale); per-chain mean: gradients in every input."""
    (x, w, beta, scale), targets, base, w_base = _fused_case(lowrank)
    if not mean:
        w, beta = w.detach(), beta.detach()
    inputs = [t for t in (x, w, beta, scale) if t is not None and t.requires_grad]
    logits = (x @ w if base is None else base @ w_base + x @ w)
    logits = (logits if scale is None else scale[..., None] * logits) + beta
    expected = torch.logsumexp(logits, -1) - logits.gather(-1, targets.expand(len(x), -1)[..., None])[..., 0]
    expected = expected.mean(dim=1) if mean else expected
    got = fused_nll(x, w, beta, targets, 4, scale=scale, base=base, w_base=w_base, mean=mean)  # 4 does not divide n = 11
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), inputs),
                    torch.autograd.grad((expected * weights).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_fused_nll_per_token_refuses_weight_gradients():
    (x, w, beta, _), targets, _, _ = _fused_case(False)
    with pytest.raises(ValueError, match="mean=True"):
        fused_nll(x, w, beta, targets, 4)


def test_fused_nll_rejects_half_a_base():
    (x, w, beta, _), targets, base, _ = _fused_case(True)
    with pytest.raises(ValueError, match="base and w_base together"):
        fused_nll(x, w, beta, targets, 4, base=base)


def test_lowrank_head_logits_equal_the_unembedding_path():
    params, (train, _, _) = _setup(CFG)
    comp = component(CFG, "L1H0")
    tokens = train[:4].unsqueeze(0)
    w = torch.stack([gather(params, comp) + 0.05 * torch.randn(comp.dim, generator=torch.Generator().manual_seed(i))
                     for i in range(2)]).requires_grad_()
    out = []
    for lowrank in (True, False):
        group = HeadGroup(params, CFG, 1, comp, [0, 1], lowrank)
        assert group.lowrank == lowrank
        with torch.no_grad():
            nll = group.losses(w, slice(0, 2), group.prepare(tokens))
        mean = group.losses(w, slice(0, 2), group.prepare(tokens), mean=True)
        torch.testing.assert_close(mean, nll.mean(dim=(1, 2)), rtol=0, atol=1e-6)
        out.append((nll.detach(), torch.autograd.grad(mean.sum(), w)[0]))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=1e-5)


def test_fused_nll_rejects_mismatched_or_moving_base():
    (x, w, beta, scale), targets, base, w_base = _fused_case(True)
    with pytest.raises(ValueError, match="rows"):
        fused_nll(x, w, beta, targets, 4, scale=scale, base=base.expand(len(x), -1, -1), w_base=w_base)
    with pytest.raises(ValueError, match="constants"):
        fused_nll(x, w, beta, targets, 4, scale=scale, base=base.requires_grad_(), w_base=w_base)
