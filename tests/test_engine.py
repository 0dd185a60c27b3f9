import numpy as np
import pytest
import torch

from susc_core.engine.inputs import UnitContexts
from susc_core.model.components import component, gather, scatter
from susc_core.engine.chains import chain_rows, pass_rows, reference_values, sample_chains
from susc_core.engine.seeds import chain_streams
from susc_core.stats.estimators import per_token_chi
from susc_core.engine.unit import run_unit
from susc_core.engine.fused_nll import blocks, fused_nll
from susc_core.engine.reference import plan_reference
from susc_core.engine.groups import CachedGroup, HeadGroup
from susc_core.model.transformer import ModelConfig, init_params, per_token_loss
from susc_core.engine.sgld import SamplerConfig

CFG = ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=16)
CFG_MLP = ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=16, d_mlp=12)
SAMPLER = SamplerConfig(step_size=1e-3, nbeta=30.0, gamma=300.0, n_chains=2, n_draws=3, batch_size=4)
CHUNK = 2048  # token rows of vocabulary logits per block (run_unit's default)


def _setup(cfg):
    gen = torch.Generator().manual_seed(0)
    params = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in init_params(cfg, gen).items()}
    contexts = [torch.randint(0, cfg.d_vocab, (n, 9), generator=gen) for n in (30, 4, 3)]
    return params, contexts


def _assert_same(a, b, atol=2e-6, rtol=1e-6):
    """Float32 agreement: the paths sum in different orders (and attention kernels differ on accelerators)."""
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].g_trace, b[key].g_trace, atol=atol, rtol=rtol, err_msg=str(key))
        np.testing.assert_allclose(a[key].sum_ga, b[key].sum_ga, atol=atol, rtol=rtol, err_msg=str(key))
        np.testing.assert_allclose(a[key].sum_a2, b[key].sum_a2, atol=atol, rtol=rtol, err_msg=str(key))


@pytest.mark.parametrize("cfg,share", [(CFG, True), (CFG, False), (CFG_MLP, True)])
def test_batched_equals_sequential_reference(cfg, share, device):
    params, (train, obs, probe) = _setup(cfg)
    sampler = SamplerConfig(**{**SAMPLER.__dict__, "share_minibatches": share})
    names = ["L*H*", "L1", "embed", "unembed", "full"] + (["L0.mlp"] if cfg.d_mlp else [])
    batched = run_unit(cfg, params, names, [0, 1], sampler, UnitContexts(train, obs, probe), seed=3, device=device)
    reference = run_unit(cfg, params, names, [0, 1], sampler, UnitContexts(train, obs, probe), seed=3, device=device,
                         mode="reference")
    _assert_same(batched, reference)
    assert len(batched) == 2 * (4 + 4 + bool(cfg.d_mlp))
    assert all(np.abs(s.g_trace).max() > 1e-4 for s in batched.values())  # chains moved
    assert batched[("L1H0", 0)].a_star.shape == (3 * 8,)


def test_chain_statistics_do_not_depend_on_grouping(device):
    params, (train, obs, probe) = _setup(CFG)
    together = run_unit(CFG, params, ["L1H*", "L0H1"], [0, 1, 2], SAMPLER, UnitContexts(train, obs, probe), seed=5, device=device)
    alone = run_unit(CFG, params, ["L1H1"], [2], SAMPLER, UnitContexts(train, obs, probe), seed=5, device=device)
    _assert_same({("L1H1", 2): together[("L1H1", 2)]}, alone)
    other_seed = run_unit(CFG, params, ["L1H1"], [2], SAMPLER, UnitContexts(train, obs, probe), seed=6, device=device)
    assert not np.allclose(other_seed[("L1H1", 2)].g_trace, alone[("L1H1", 2)].g_trace)
    assert not np.allclose(together[("L1H1", 0)].g_trace, together[("L1H1", 1)].g_trace)



def test_progress_counts_every_chain_draw_of_the_plan_and_changes_nothing(device):
    """``on_progress`` gets (chain·draws done, of the unit) after every draw of every planned stack, in order, ending
    at the total; the statistics are bitwise those of a run without it."""
    params, (train, obs, probe) = _setup(CFG)
    names, chains, calls = ["L0H1", "L1H*", "full"], [0, 1], []
    reported = run_unit(CFG, params, names, chains, SAMPLER, UnitContexts(train, obs, probe), seed=3, device=device,
                        on_progress=lambda done, total: calls.append((done, total)))
    plain = run_unit(CFG, params, names, chains, SAMPLER, UnitContexts(train, obs, probe), seed=3, device=device)
    # the plan's stacks in order: layer-1 heads (2 heads x 2 chains), layer-0 head (1 x 2), full (1 x 2); 3 draws each
    total = (4 + 2 + 2) * SAMPLER.n_draws
    expected = [(before + size * d, total) for before, size in ((0, 4), (12, 2), (18, 2))
                for d in range(1, SAMPLER.n_draws + 1)]
    assert calls == expected and calls[-1] == (total, total)
    assert reported.keys() == plain.keys()
    for key in plain:
        assert all(np.array_equal(getattr(reported[key], f), getattr(plain[key], f)) for f in ("g_trace", "sum_ga"))

def test_divergence_policies(device):
    params, (train, obs, probe) = _setup(CFG)
    wild = SamplerConfig(**{**SAMPLER.__dict__, "step_size": 0.5, "gamma": 1.0, "nbeta": 1e4, "blowup_nats": 1.0})
    with pytest.raises(RuntimeError, match="diverged"):
        run_unit(CFG, params, ["full"], [0], wild, UnitContexts(train, obs, probe), seed=1, device=device)
    with pytest.warns(RuntimeWarning, match="diverged"):
        out = run_unit(CFG, params, ["full"], [0], SamplerConfig(**{**wild.__dict__, "divergence_policy": "drop"}),
                       UnitContexts(train, obs, probe), seed=1, device=device)
    assert out[("full", 0)].diverged and 1 <= out[("full", 0)].diverged_step <= wild.n_steps


def test_bad_inputs_are_named():
    params, (train, obs, probe) = _setup(CFG)
    with pytest.raises(ValueError, match="unknown component 'L5H0'"):
        run_unit(CFG, params, ["L5H0"], [0], SAMPLER, UnitContexts(train, obs, probe), seed=1)
    with pytest.raises(ValueError, match="same length"):
        run_unit(CFG, params, ["full"], [0], SAMPLER, UnitContexts(train, obs[:, :4], probe), seed=1)
    with pytest.raises(ValueError, match="probe_contexts holds token ids"):
        run_unit(CFG, params, ["full"], [0], SAMPLER, UnitContexts(train, obs, probe + 100), seed=1)
    with pytest.raises(ValueError, match="batch_size"):
        run_unit(CFG, params, ["full"], [0], SamplerConfig(**{**SAMPLER.__dict__, "batch_size": 99}),
                 UnitContexts(train, obs, probe), seed=1)


def _fused_case(lowrank: bool, device="cpu"):
    gen = torch.Generator().manual_seed(7)
    k, n, r, d, v = 3, 11, 4, 5, 9
    rnd = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)  # noqa: E731
    x, beta = rnd(k, n, r).requires_grad_(), rnd(v).requires_grad_()
    if lowrank:
        w, targets = rnd(k, r, v).requires_grad_(), torch.randint(0, v, (1, n), generator=gen).to(device)
        scale = (torch.rand(k, n, generator=gen, dtype=torch.float64).to(device) + 0.5).requires_grad_()
        base, w_base = rnd(1, n, d), rnd(d, v)
        return (x, w, beta, scale), targets, base, w_base
    return ((x, rnd(1, r, v).requires_grad_(), beta, None), torch.randint(0, v, (k, n), generator=gen).to(device),
            None, None)


@pytest.mark.parametrize("lowrank", [False, True])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("chunk", [4, 25, 100])  # n = 11 tokens, k = 3 chains: token chunks; 2 + 1 chains; all
def test_fused_nll_value_and_gradient_equal_autograd(lowrank, mean, chunk, device):
    """Per-token output: gradients in x (and scale); per-chain mean: gradients in every input."""
    (x, w, beta, scale), targets, base, w_base = _fused_case(lowrank, device)
    if not mean:
        w, beta = w.detach(), beta.detach()
    inputs = [t for t in (x, w, beta, scale) if t is not None and t.requires_grad]
    logits = (x @ w if base is None else base @ w_base + x @ w)
    logits = (logits if scale is None else scale[..., None] * logits) + beta
    expected = torch.logsumexp(logits, -1) - logits.gather(-1, targets.expand(len(x), -1)[..., None])[..., 0]
    expected = expected.mean(dim=1) if mean else expected
    got = fused_nll(x, w, beta, targets, chunk, scale=scale, base=base, w_base=w_base, mean=mean)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
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


def _moved_chains(name: str, n_chains: int, n_contexts: int, device):
    """params, the component, n_chains perturbed copies of its coordinates [n_chains, dim] (leaf) and
    shared tokens [1, n_contexts, S+1], on ``device``."""
    params, (train, _, _) = _setup(CFG)
    params = {k: v.to(device) for k, v in params.items()}
    comp = component(CFG, name)
    noise = [torch.randn(comp.dim, generator=torch.Generator().manual_seed(i)) for i in range(n_chains)]
    w = torch.stack([gather(params, comp) + 0.05 * e.to(device) for e in noise]).requires_grad_()
    return params, comp, w, train[:n_contexts].unsqueeze(0).to(device)


def _losses_and_gradient(group, w, tokens):
    """Per-token losses [k, B, S] and the gradient of the chains' summed mean losses in w; checks that
    ``mean=True`` is the token mean."""
    rows = pass_rows(torch.zeros(len(w), dtype=torch.long, device=w.device), len(w))[0]
    with torch.no_grad():
        nll = group.losses(w, rows, group.prepare(tokens))
    mean = group.losses(w, rows, group.prepare(tokens), mean=True)
    torch.testing.assert_close(mean, nll.mean(dim=(1, 2)), rtol=0, atol=1e-6)
    return nll, torch.autograd.grad(mean.sum(), w)[0]


def _assert_same_losses_and_gradient(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-5)


def test_lowrank_head_logits_equal_the_unembedding_path(device):
    params, comp, w, tokens = _moved_chains("L1H0", 2, 4, device)
    out = []
    for lowrank in (True, False):
        group = HeadGroup(params, CFG, 1, comp, [0, 1], CHUNK, lowrank)
        assert group.lowrank == lowrank
        out.append(_losses_and_gradient(group, w, tokens))
    _assert_same_losses_and_gradient(*out)


def test_fused_nll_rejects_mismatched_or_moving_base():
    (x, w, beta, scale), targets, base, w_base = _fused_case(True)
    with pytest.raises(ValueError, match="rows"):
        fused_nll(x, w, beta, targets, 4, scale=scale, base=base.expand(len(x), -1, -1), w_base=w_base)
    with pytest.raises(ValueError, match="constants"):
        fused_nll(x, w, beta, targets, 4, scale=scale, base=base.requires_grad_(), w_base=w_base)


@pytest.mark.parametrize("k,n,chunk", [(3, 11, 4), (3, 11, 11), (5, 11, 25), (4, 8, 1000)])
def test_fused_nll_blocks_cover_every_row_once(k, n, chunk):
    seen = torch.zeros(k, n, dtype=torch.int64)
    for chains, tokens in blocks(k, n, chunk):
        assert (chains.stop - chains.start) * (tokens.stop - tokens.start) <= max(chunk, 1)
        seen[chains, tokens] += 1
    assert torch.equal(seen, torch.ones(k, n, dtype=torch.int64))


@pytest.mark.parametrize("name", ["full", "L1", "embed", "unembed"])
def test_vmapped_chains_equal_the_per_chain_loop(name, device):
    """CachedGroup's accelerator form (one vmapped forward, explicit attention pattern) = its CPU loop."""
    params, comp, w, tokens = _moved_chains(name, 3, 3, device)
    out = [_losses_and_gradient(CachedGroup(params, CFG, comp, CHUNK, vmap_chains), w, tokens)
           for vmap_chains in (True, False)]
    assert out[0][0].shape == (3, 3, 8)
    _assert_same_losses_and_gradient(*out)


@pytest.mark.parametrize("name", ["L0H1", "L1H0", "embed", "unembed", "full"])
def test_reference_group_equals_the_plain_model_under_autograd(name, device):
    """The sequential reference's group (fused vocabulary kernel; a head recomputed apart from its layer) =
    the model's own per-token loss and its autograd gradient, chain by chain: what the batched plan is
    tested against is the plain model."""
    params, comp, w, tokens = _moved_chains(name, 2, 3, device)
    (group, _), = plan_reference(params, CFG, [name], [0], CHUNK)
    ours = [_losses_and_gradient(group, w[i:i + 1], tokens) for i in range(len(w))]
    plain = torch.stack([per_token_loss(scatter(params, comp, w_i), CFG, tokens[0]) for w_i in w])
    grad = torch.autograd.grad(plain.mean(dim=(1, 2)).sum(), w)[0]
    _assert_same_losses_and_gradient((torch.cat([o[0] for o in ours]), torch.cat([o[1] for o in ours])),
                                     (plain.detach(), grad))
    assert grad.abs().max() > 1e-3  # the loss depends on the component


def test_bf16_forward_stays_near_fp32(device):
    """forward_dtype=bfloat16 (autocast) runs every group and keeps losses and gradients in fp32 sums."""
    params, (train, obs, probe) = _setup(CFG_MLP)
    names = ["L*H*", "L1", "full"]
    fp32 = run_unit(CFG_MLP, params, names, [0], SAMPLER, UnitContexts(train, obs, probe), seed=2, device=device)
    bf16 = run_unit(CFG_MLP, params, names, [0], SamplerConfig(**{**SAMPLER.__dict__, "forward_dtype": "bfloat16"}),
                    UnitContexts(train, obs, probe), seed=2, device=device)
    for key in fp32:
        assert np.isfinite(bf16[key].g_trace).all() and not bf16[key].diverged
        np.testing.assert_allclose(bf16[key].a_star, fp32[key].a_star)  # references are always fp32
        np.testing.assert_allclose(bf16[key].g_trace, fp32[key].g_trace, atol=2e-3, err_msg=str(key))  # |g| ~ 0.01-0.1


def test_chain_streams_one_minibatch_stream_per_chain_index():
    """Independent streams: chain k of every component reads stream k, different chain indices read
    different minibatches; shared: one stream for all. A chain's stream does not depend on its stack."""
    members = [("L1H0", 0), ("L1H0", 2), ("L1H1", 0), ("L1H1", 2)]
    streams = chain_streams(7, members, False, 30, 5, 4, "cpu")
    assert streams.token_rows.tolist() == [0, 1, 0, 1] and streams.schedule.shape == (5, 2 * 4)
    assert not torch.equal(streams.schedule[:, :4], streams.schedule[:, 4:])
    alone = chain_streams(7, [("L0H1", 2)], False, 30, 5, 4, "cpu")
    assert torch.equal(alone.schedule, streams.schedule[:, 4:])
    shared = chain_streams(7, members, True, 30, 5, 4, "cpu")
    assert shared.token_rows.tolist() == [0] * 4 and shared.schedule.shape == (5, 4)


class _Spy:
    """A ``chains.Group`` that records the training tokens each chain row of a step reads."""

    def __init__(self, group):
        self.group, self.seen = group, []

    def prepare(self, tokens):
        self.last = tokens
        return self.group.prepare(tokens)

    def losses(self, w, rows, cache, mean=False):
        if mean:
            self.seen.append(chain_rows(self.last, rows))
        return self.group.losses(w, rows, cache, mean)


def test_independent_chains_of_a_component_read_different_minibatches():
    params, (train, obs, probe) = _setup(CFG)
    spy = _Spy(CachedGroup(params, CFG, component(CFG, "L1"), CHUNK))
    streams = chain_streams(0, [("L1", 0), ("L1", 1)], False, len(train), SAMPLER.n_steps, SAMPLER.batch_size, "cpu")
    ref = reference_values(lambda t: per_token_loss(params, CFG, t), UnitContexts(train, obs, probe), CHUNK)
    w0 = gather(params, component(CFG, "L1"))
    sample_chains(spy, w0, streams, UnitContexts(train, obs, probe), ref, SAMPLER, CHUNK)
    assert len(spy.seen) == SAMPLER.n_steps and all(seen.shape[0] == 2 for seen in spy.seen)
    for step, seen in enumerate(spy.seen):
        torch.testing.assert_close(seen[0], train[streams.schedule[step, :4]], rtol=0, atol=0)
        torch.testing.assert_close(seen[1], train[streams.schedule[step, 4:]], rtol=0, atol=0)
    assert any(not torch.equal(seen[0], seen[1]) for seen in spy.seen)


def test_independent_chains_are_reproducible_and_their_se_is_the_across_chain_formula():
    params, (train, obs, probe) = _setup(CFG)
    sampler = SamplerConfig(**{**SAMPLER.__dict__, "n_draws": 6})
    assert not sampler.share_minibatches  # the default
    runs = [run_unit(CFG, params, ["L1H0", "full"], [0, 1, 2], sampler, UnitContexts(train, obs, probe), seed=4) for _ in range(2)]
    for key in runs[0]:
        assert np.array_equal(runs[0][key].g_trace, runs[1][key].g_trace)
        assert np.array_equal(runs[0][key].sum_ga, runs[1][key].sum_ga)
    out = runs[0]
    comp, full = [out[("L1H0", c)] for c in range(3)], [out[("full", c)] for c in range(3)]
    estimate = per_token_chi(comp, full)
    mean_full_a = sum(c.sum_a for c in full) / sum(c.count for c in full)
    per_chain = np.stack([-(c.sum_ga / c.count - c.g_trace.mean() * mean_full_a) for c in comp])
    mean_g = np.mean([c.g_trace.mean() for c in comp])
    centring = np.stack([mean_g * c.sum_a / c.count for c in full])  # the full run's chains, its own noise
    want = np.sqrt(per_chain.var(axis=0, ddof=1) / 3 + centring.var(axis=0, ddof=1) / 3)
    np.testing.assert_allclose(estimate.se, want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(estimate.value, per_chain.mean(axis=0), rtol=1e-6, atol=1e-12)
