import numpy as np
import pytest
import torch

from susc_core.engine import run_unit
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
