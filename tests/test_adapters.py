"""Adapters for real models: masks count exactly a component's parameters, losses equal the models' own,
and the adapter work unit reproduces the engine's statistics. Tiny random models built in-process from their
config classes (every family of ``hf.FAMILIES``, ``FAMILIES`` here), TransformerLens models saved and loaded,
unsupported architectures refused from their config alone."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from susc_core.engine.inputs import UnitContexts
from susc_core.model import transformer as M
from susc_core.adapters.base import flat_indices, gather_indexed, scatter_indexed
from susc_core.model.chunked_nll import chunked_nll
from susc_core.adapters.bundled import BundledAdapter
from susc_core.adapters.engine import chains_per_pass_for_budget, AdapterGroup, run_adapter_unit
from susc_core.engine import sgld
from susc_core.engine.chains import pass_rows
from susc_core.engine.sgld import SamplerConfig

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

D_MODEL, N_HEADS, N_KV, VOCAB, N_CTX, D_MLP = 16, 4, 2, 40, 12, 24
D_HEAD = D_MODEL // N_HEADS
ZERO_HEAD_ATOL = 1e-5  # nats: float32 rounding of ~4-nat losses, 100x below a head's effect here
SGLD_CHAINS = 2
HALF_ROTARY = {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"}  # 2 of 4 dims rotate


class Family(NamedTuple):
    """A tiny model of one supported family and what its attention holds, written down independently of the
    adapter (transformers' own module names)."""

    config: str  # transformers config class
    model: str  # transformers *ForCausalLM class
    attn: str  # module path of layer {l}'s attention
    out: str  # its output projection (input: the heads' outputs, head h at features [h·d, (h+1)·d))
    qkv_bias: bool  # q/k/v projections have biases
    out_bias: bool  # the output projection has a bias (the layer's, not a head's)
    grouped: bool  # N_KV key/value heads shared by N_HEADS query heads (else one per head)
    qk_norm: bool = False  # per-head q/k norms [d_head] each (the layer's)
    mlp: tuple[str, ...] = ("mlp",)  # the MLP's modules inside a block
    pos_embed: bool = False  # learned positions
    tied: bool = False  # LM head tied to the token embedding
    extra: dict = {}  # config keywords beyond the shared shape


_GQA = dict(attn="model.layers.{l}.self_attn", out="o_proj", out_bias=False, grouped=True)
FAMILIES = {
    "gpt2": Family("GPT2Config", "GPT2LMHeadModel", "transformer.h.{l}.attn", "c_proj", True, True, False,
                   pos_embed=True, tied=True, extra=dict(bos_token_id=0, eos_token_id=0)),
    "gpt_neox": Family("GPTNeoXConfig", "GPTNeoXForCausalLM", "gpt_neox.layers.{l}.attention", "dense", True, True,
                       False, extra=dict(rope_parameters=HALF_ROTARY)),
    "llama": Family("LlamaConfig", "LlamaForCausalLM", qkv_bias=True, **_GQA | dict(out_bias=True),
                    extra=dict(attention_bias=True)),
    "qwen2": Family("Qwen2Config", "Qwen2ForCausalLM", qkv_bias=True, **_GQA),
    "qwen3": Family("Qwen3Config", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, **_GQA),
    "mistral": Family("MistralConfig", "MistralForCausalLM", qkv_bias=False, **_GQA),
    "gemma": Family("GemmaConfig", "GemmaForCausalLM", qkv_bias=False, tied=True, **_GQA),
    "gemma2": Family("Gemma2Config", "Gemma2ForCausalLM", qkv_bias=False, tied=True, **_GQA,
                     extra=dict(final_logit_softcapping=None)),  # soft-capped logits are refused
    "gemma3_text": Family("Gemma3TextConfig", "Gemma3ForCausalLM", qkv_bias=False, qk_norm=True, tied=True, **_GQA),
    "phi": Family("PhiConfig", "PhiForCausalLM", qkv_bias=True, **_GQA | dict(out="dense", out_bias=True),
                  extra=dict(rope_parameters=HALF_ROTARY)),
    "phi3": Family("Phi3Config", "Phi3ForCausalLM", qkv_bias=False, **_GQA,
                   extra=dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "opt": Family("OPTConfig", "OPTForCausalLM", "model.decoder.layers.{l}.self_attn", "out_proj", True, True, False,
                  mlp=("fc1", "fc2"), pos_embed=True, tied=True,
                  extra=dict(ffn_dim=D_MLP, word_embed_proj_dim=D_MODEL, pad_token_id=1)),
}


@functools.lru_cache(maxsize=None)
def family_adapter(name: str, shared_kv: bool = True):
    """An ``HFAdapter`` over a tiny random model of family ``name`` (2 layers, built from its config class)."""
    from susc_core.adapters.hf import HFAdapter
    f = FAMILIES[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, f.config)(
        num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=N_HEADS, head_dim=D_HEAD,
        num_key_value_heads=N_KV if f.grouped else N_HEADS, intermediate_size=D_MLP, vocab_size=VOCAB,
        max_position_embeddings=N_CTX, attn_implementation="eager", **f.extra)
    assert cfg.model_type == name
    return HFAdapter(getattr(transformers, f.model)(cfg), loss_chunk_tokens=7, shared_kv=shared_kv)


@pytest.fixture(scope="module")
def gpt2():
    return family_adapter("gpt2")


@pytest.fixture(scope="module")
def llama():
    return family_adapter("llama")


def _tokens(n=3, length=N_CTX, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _count(adapter, name):
    return sum(i.numel() for i in flat_indices(adapter.component_mask(name), adapter.params()).values())


def _indices(adapter, name):
    return {p: set(i.tolist()) for p, i in flat_indices(adapter.component_mask(name), adapter.params()).items()}


def _restricted_grad(adapter, params, name, tokens):
    """{param: grad on the component's coordinates} of the mean loss, restricted to component ``name``."""
    index = flat_indices(adapter.component_mask(name), params)
    w = gather_indexed(params, index).requires_grad_(True)
    grad = torch.autograd.grad(adapter.per_token_loss(scatter_indexed(params, index, w), tokens).mean(), w)[0]
    return dict(zip(index, torch.split(grad, [i.numel() for i in index.values()])))


def test_chunked_nll_matches_cross_entropy_under_vmap():
    g = torch.Generator().manual_seed(0)
    x, w_u, b_u = torch.randn(3, 2, 5, 6, generator=g), torch.randn(11, 6, generator=g), torch.randn(11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    xs, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = vmap(lambda xi: chunked_nll(xi, w_u, b_u, targets, chunk_tokens=3))(xs)
    ref = torch.stack([F.cross_entropy((xi @ w_u.T + b_u).reshape(-1, 11), targets.reshape(-1), reduction="none")
                       for xi in xr]).reshape(3, 2, 5)
    weights = torch.randn(3, 2, 5, generator=g)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad((ours * weights).sum(), xs)[0],
                               torch.autograd.grad((ref * weights).sum(), xr)[0])


def _attention(adapter, family: Family, layer: int) -> dict[str, int]:
    """{param name: numel} of every parameter of the layer's attention module."""
    prefix = family.attn.format(l=layer) + "."
    return {n: p.numel() for n, p in adapter.params().items() if n.startswith(prefix)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_component_names_are_transformer_lens_style(name):
    adapter, f = family_adapter(name), FAMILIES[name]
    heads = [f"L{l}H{h}" for l in range(2) for h in range(N_HEADS)]
    named = ["embed"] + ["pos_embed"] * f.pos_embed + ["ln_final", "unembed", "full"]
    assert adapter.component_names() == heads + ["L0", "L0.mlp", "L1", "L1.mlp"] + named
    params = adapter.params()
    block = f.attn.format(l=1).rsplit(".", 1)[0] + "."
    assert _count(adapter, "L1") == sum(p.numel() for n, p in params.items() if n.startswith(block))
    mlp = tuple(f"{block}{m}." for m in f.mlp)
    assert _count(adapter, "L1.mlp") == sum(p.numel() for n, p in params.items() if n.startswith(mlp)) > 0
    assert _count(adapter, "embed") == VOCAB * D_MODEL
    if f.pos_embed:  # one row per position (OPT's two offset rows are never read)
        assert _count(adapter, "pos_embed") == N_CTX * D_MODEL
    assert (adapter.component_mask("unembed") == adapter.component_mask("embed")) == f.tied
    assert _count(adapter, "full") == sum(p.numel() for p in adapter.module.parameters())


@pytest.mark.parametrize("shared_kv", [True, False])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_head_masks_cover_the_attention_as_documented(name, shared_kv):
    """A head: its q rows (+ bias), its output columns and, when it holds k/v (no grouping, or shared_kv), the
    k/v rows (+ biases) of its KV group; two heads overlap exactly in a shared KV group's k/v; what no head
    holds is the output bias, the q/k norms and, for a grouped model without shared_kv, every k/v row."""
    adapter, f = family_adapter(name, shared_kv), FAMILIES[name]
    holds_kv = shared_kv or not f.grouped
    proj = D_MODEL * D_HEAD + D_HEAD * f.qkv_bias  # one projection's rows (+ bias) for one head or KV group
    n_kv = N_KV if f.grouped else N_HEADS
    heads = [_indices(adapter, f"L1H{h}") for h in range(N_HEADS)]
    for h in range(N_HEADS):
        assert _count(adapter, f"L1H{h}") == (3 if holds_kv else 1) * proj + D_HEAD * D_MODEL
        assert set(heads[h]) <= set(_attention(adapter, f, 1))
        for other in range(h + 1, N_HEADS):
            shared = sum(len(heads[h][p] & heads[other][p]) for p in heads[h] if p in heads[other])
            same_group = h * n_kv // N_HEADS == other * n_kv // N_HEADS
            assert shared == (2 * proj if holds_kv and same_group and f.grouped else 0), (h, other)
    union = sum(len(set().union(*(hd.get(p, set()) for hd in heads))) for p in _attention(adapter, f, 1))
    layer_only = D_MODEL * f.out_bias + 2 * D_HEAD * f.qk_norm + (0 if holds_kv else 2 * n_kv * proj)
    assert union + layer_only == sum(_attention(adapter, f, 1).values())


def test_opt_with_projections_and_post_norm():
    """OPT-350m's layout: word embeddings narrower than the residual (``project_in`` / ``project_out``, part of
    ``embed`` / ``unembed``) and post-norm blocks without a final norm; the loss is still the model's own."""
    from susc_core.adapters.hf import HFAdapter
    narrow = D_MODEL // 2
    torch.manual_seed(0)
    cfg = transformers.OPTConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                                 ffn_dim=D_MLP, vocab_size=VOCAB, max_position_embeddings=N_CTX,
                                 word_embed_proj_dim=narrow, do_layer_norm_before=False, attn_implementation="eager")
    adapter = HFAdapter(transformers.OPTForCausalLM(cfg), loss_chunk_tokens=7)
    assert "ln_final" not in adapter.component_names()
    assert _count(adapter, "embed") == VOCAB * narrow + narrow * D_MODEL
    assert _count(adapter, "unembed") == VOCAB * narrow + D_MODEL * narrow
    tokens = _tokens()
    torch.testing.assert_close(adapter.per_token_loss(adapter.params(), tokens).reshape(-1),
                               _model_nll(adapter.module, tokens), rtol=0, atol=1e-5)


def _readers(f: Family, head: int, shared_kv: bool) -> list[int]:
    """The heads whose outputs read head ``head``'s q/k/v coordinates: its KV group when it holds the group's
    k/v (a grouped model with shared_kv), else itself."""
    if not (f.grouped and shared_kv):
        return [head]
    size = N_HEADS // N_KV
    return list(range(head // size * size, (head // size + 1) * size))


def _split_head(adapter, f: Family, layer: int, head: int) -> tuple[dict, dict]:
    """(q/k/v part, output-projection part) of the head's mask, told apart by the family's module names."""
    out = f"{f.attn.format(l=layer)}.{f.out}."
    mask = adapter.head_mask(layer, head)
    return ({p: i for p, i in mask.items() if not p.startswith(out)},
            {p: i for p, i in mask.items() if p.startswith(out)})


def _zeroed(params, *masks):
    """A copy of params with the coordinates each mask selects set to zero."""
    params = dict(params)
    for mask in masks:
        for p, index in mask.items():
            params[p] = params[p].clone()
            params[p][index] = 0.0
    return params


@pytest.mark.parametrize("shared_kv", [True, False])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_silenced_readers_give_zero_query_key_value_gradient(name, shared_kv):
    """Zero the output columns of every head that reads head 1's q/k/v: the gradient on those q/k/v coordinates
    is exactly zero, the output columns' is not; in a shared KV group, head 1 silenced alone leaves its
    k/v gradient non-zero (the other heads of the group read them)."""
    adapter, f = family_adapter(name, shared_kv), FAMILIES[name]
    tokens, params = _tokens(), adapter.params()
    readers = _readers(f, 1, shared_kv)
    qkv, out = _split_head(adapter, f, 1, 1)
    grad = _restricted_grad(adapter, _zeroed(params, *(_split_head(adapter, f, 1, h)[1] for h in readers)), "L1H1",
                            tokens)
    assert all(torch.all(grad[p] == 0) for p in qkv)
    assert all(grad[p].abs().sum() > 0 for p in out)
    if len(readers) > 1:
        grad = _restricted_grad(adapter, _zeroed(params, out), "L1H1", tokens)
        assert any(grad[p].abs().sum() > 0 for p in qkv)


def _model_nll(module, tokens) -> torch.Tensor:
    """The model's own per-token NLL [batch·(seq-1)] from its forward logits (cross-entropy), nats."""
    with torch.no_grad():
        logits = module(tokens).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")


def _nll_without_heads(module, out_proj: str, heads: list[int], tokens) -> torch.Tensor:
    """The model's own per-token NLL with the given heads' outputs removed: a forward pre-hook zeroes input
    features ``[h·d, (h+1)·d)`` of the attention output projection at ``out_proj`` (TransformerLens's
    ``hook_z`` flattened). Independent of the adapter's masks. [batch·(seq-1)] nats."""
    def silence(_module, args):
        z = args[0].clone()
        for h in heads:
            z[..., h * D_HEAD:(h + 1) * D_HEAD] = 0.0
        return (z, *args[1:])

    handle = module.get_submodule(out_proj).register_forward_pre_hook(silence)
    try:
        return _model_nll(module, tokens)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_zeroing_a_head_through_its_mask_equals_removing_its_output(name):
    """For every head of layer 1: zeroing its output-projection coordinates through the mask equals removing its
    output (``_nll_without_heads``); zeroing its q/k/v coordinates (v = 0, so the head's output is 0) equals
    removing the outputs of the heads that read them (its KV group with shared_kv). A slice of the wrong head,
    or of q/k/v another head reads, would change some other head's output and break the equality."""
    adapter, f = family_adapter(name), FAMILIES[name]
    tokens, params = _tokens(), adapter.params()
    out_proj, intact = f"{f.attn.format(l=1)}.{f.out}", adapter.per_token_loss(params, tokens).reshape(-1)
    for h in range(N_HEADS):
        qkv, out = _split_head(adapter, f, 1, h)
        for part, silenced in ((qkv, _readers(f, h, True)), (out, [h])):
            ours = adapter.per_token_loss(_zeroed(params, part), tokens).reshape(-1)
            torch.testing.assert_close(ours, _nll_without_heads(adapter.module, out_proj, silenced, tokens), rtol=0,
                                       atol=ZERO_HEAD_ATOL)
            assert (ours - intact).abs().max() > 100 * ZERO_HEAD_ATOL  # the head matters: the check can fail


@pytest.mark.parametrize("component", ["L1H1", "L0.mlp"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_restricted_sgld_chains_move_only_the_component(name, component):
    """SGLD steps (``sgld.step`` on ``AdapterGroup``, as the engine runs them) of two chains restricted to a
    component move exactly its coordinates and no other; their first gradient is the model's own (autograd of
    its forward loss), gathered at those coordinates."""
    adapter = family_adapter(name)
    params = adapter.params()
    index = flat_indices(adapter.component_mask(component), params)
    group, w_star = AdapterGroup(adapter, params, index), gather_indexed(params, index)
    rows = pass_rows(torch.zeros(SGLD_CHAINS, dtype=torch.long), SGLD_CHAINS)[0]

    def grad_fn(w, tokens):
        leaf = w.detach().requires_grad_(True)
        loss = group.losses(leaf, rows, tokens, mean=True)
        return loss.detach(), torch.autograd.grad(loss.sum(), leaf)[0]

    tokens = _tokens(4, 8)
    module_params = dict(adapter.module.named_parameters())
    adapter.module.zero_grad()
    adapter.module(tokens, labels=tokens).loss.backward()
    own = torch.cat([module_params[p].grad.reshape(-1)[i] for p, i in index.items()])
    torch.testing.assert_close(grad_fn(w_star[None], tokens[None])[1][0], own, rtol=1e-4, atol=1e-6)

    state = sgld.init(w_star, SGLD_CHAINS)
    generators = [torch.Generator().manual_seed(c) for c in range(SGLD_CHAINS)]
    for step in range(3):
        state, _ = sgld.step(generators, state, _tokens(4, 8, seed=step)[None], grad_fn, w_star, step_size=1e-3,
                             nbeta=10.0, gamma=100.0)
    expected = {p: set(i.tolist()) for p, i in index.items()}
    for w in state.w:
        moved = scatter_indexed(params, index, w)
        changed = {p: set(torch.nonzero((moved[p] != params[p]).reshape(-1))[:, 0].tolist()) for p in params}
        assert {p: c for p, c in changed.items() if c} == expected


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_per_token_loss_equals_model_loss(name):
    adapter = family_adapter(name)
    tokens = _tokens()
    ours = adapter.per_token_loss(adapter.params(), tokens)
    with torch.no_grad():
        loss = adapter.module(tokens, labels=tokens).loss
    assert ours.shape == (3, N_CTX - 1)
    torch.testing.assert_close(ours.reshape(-1), _model_nll(adapter.module, tokens), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.mean(), loss, rtol=0, atol=1e-5)


def test_unknown_component_and_globs(llama):
    with pytest.raises(ValueError, match=r"unknown component 'L9H0'.*valid names: L0H0, L0H1"):
        run_adapter_unit(llama, ["L9H0"], [0], SamplerConfig(1e-3, 10, 100), UnitContexts(_tokens(), _tokens(), _tokens()),
                         seed=0)
    with pytest.raises(ValueError, match="unknown component 'pos_embed'"):
        llama.component_mask("pos_embed")  # Llama has rotary positions, no learned embedding
    with pytest.raises(ValueError, match="concrete name"):
        llama.component_mask("L1H*")


def _sampler(**overrides):
    base = dict(step_size=1e-3, nbeta=10.0, gamma=100.0, n_chains=3, n_draws=3, batch_size=4)
    return SamplerConfig(**(base | overrides))


def _contexts(length=8):
    return _tokens(10, length, seed=1), _tokens(3, length, seed=2), _tokens(2, length, seed=3)


def _assert_same_stats(x, y, atol=1e-6):
    """Equal up to float32 rounding (``atol`` in nats: batched and looped matmuls round differently, and
    g = L_n(draw) - L_n(w*) is a difference of losses near 8 nats, whose float32 spacing is about 5e-7)."""
    for field in ("g_trace", "sum_ga", "sum_a"):
        np.testing.assert_allclose(getattr(x, field), getattr(y, field), rtol=1e-5, atol=atol, err_msg=field)


def test_chain_alone_equals_chain_in_group(llama, device):
    train, obs, probe = _contexts()
    group = run_adapter_unit(llama, ["L1H1", "L0.mlp"], [0, 1, 2], _sampler(), UnitContexts(train, obs, probe), seed=5, device=device)
    alone = run_adapter_unit(llama, ["L0.mlp"], [1], _sampler(), UnitContexts(train, obs, probe), seed=5, device=device)
    _assert_same_stats(group["L0.mlp", 1], alone["L0.mlp", 1])
    assert group["L1H1", 0].count == 3 and np.any(group["L1H1", 0].g_trace != 0)
    assert not np.allclose(group["L1H1", 0].g_trace, group["L1H1", 1].g_trace)  # distinct noise streams


def test_memory_budget_chunks_chains_without_changing_results(gpt2):
    train, obs, probe = _contexts()
    params = gpt2.params()
    index = flat_indices(gpt2.component_mask("L0H1"), params)
    group = AdapterGroup(gpt2, params, index)
    w_star, batch = gather_indexed(params, index), train[:4].unsqueeze(0)
    fit_big = chains_per_pass_for_budget(group, w_star, batch, memory_budget_mib=1e3)
    assert fit_big > 3
    with pytest.raises(ValueError, match="memory_budget_mib=1e-06 is below"):
        chains_per_pass_for_budget(group, w_star, batch, memory_budget_mib=1e-6)
    whole = run_adapter_unit(gpt2, ["L0H1"], [0, 1], _sampler(n_draws=2), UnitContexts(train, obs, probe), seed=2)
    split = run_adapter_unit(gpt2, ["L0H1"], [0, 1], _sampler(n_draws=2, chains_per_pass=1), UnitContexts(train, obs, probe),
                             seed=2)
    for c in range(2):
        _assert_same_stats(whole["L0H1", c], split["L0H1", c])


def test_bundled_adapter_reproduces_engine_run_unit():
    from susc_core.engine.unit import run_unit
    cfg = M.ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=8, d_vocab=VOCAB)
    w_star = M.init_params(cfg, torch.Generator().manual_seed(0))
    adapter = BundledAdapter(w_star, cfg, loss_chunk_tokens=16)
    tokens = _tokens(2, 8)
    torch.testing.assert_close(adapter.per_token_loss(adapter.params(), tokens), M.per_token_loss(w_star, cfg, tokens))
    train, obs, probe = _contexts()
    names = ["L1H*", "full"]
    ours = run_adapter_unit(adapter, names, [0, 1], _sampler(), UnitContexts(train, obs, probe), seed=3)
    engine = run_unit(cfg, w_star, names, [0, 1], _sampler(), UnitContexts(train, obs, probe), seed=3, chunk_tokens=16)
    assert set(ours) == set(engine)
    for key in engine:
        _assert_same_stats(ours[key], engine[key], atol=2e-6)


def test_bfloat16_forward_keeps_fp32_reference(llama, device):
    train, obs, probe = _contexts()
    fp32 = run_adapter_unit(llama, ["L1H0"], [0], _sampler(), UnitContexts(train, obs, probe), seed=1, device=device)
    bf16 = run_adapter_unit(llama, ["L1H0"], [0], _sampler(forward_dtype="bfloat16"), UnitContexts(train, obs, probe), seed=1,
                            device=device)
    a, b = fp32["L1H0", 0], bf16["L1H0", 0]
    assert a.loss_star == b.loss_star and np.all(np.isfinite(b.g_trace))
    assert np.abs(a.g_trace - b.g_trace).max() < 0.05 * max(np.abs(a.g_trace).max(), 1e-3) + 1e-3


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_per_token_loss_on_the_device_equals_the_cpu(name, device):
    """Parameters and tokens on ``device``: the module's buffers follow them (the module stays put)."""
    adapter = family_adapter(name)
    tokens = _tokens()
    on_device = adapter.per_token_loss({k: v.to(device) for k, v in adapter.params().items()}, tokens.to(device))
    assert on_device.device.type == torch.device(device).type
    torch.testing.assert_close(on_device.cpu(), adapter.per_token_loss(adapter.params(), tokens), rtol=1e-5, atol=1e-5)
    assert next(adapter.module.parameters()).device.type == "cpu"


def _hooked_transformer(**overrides):
    """A tiny random ``HookedTransformer`` (2 layers, LayerNorm, learned positions)."""
    tl = pytest.importorskip("transformer_lens", reason="the [tl] extra (transformer-lens 3.x) is not installed")
    kwargs = dict(n_layers=2, d_model=D_MODEL, n_heads=N_HEADS, d_head=D_HEAD, n_ctx=N_CTX, d_vocab=VOCAB,
                  d_mlp=D_MLP, act_fn="gelu", normalization_type="LN", seed=0)
    return tl.HookedTransformer(tl.HookedTransformerConfig(**(kwargs | overrides)))


def test_tl_adapter():
    from susc_core.adapters.tl import TLAdapter
    adapter = TLAdapter(_hooked_transformer(), loss_chunk_tokens=7)
    assert _count(adapter, "L1H2") == 4 * D_MODEL * D_HEAD + 3 * D_HEAD
    tokens = _tokens()
    with torch.no_grad():
        own = adapter.module(tokens, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(adapter.per_token_loss(adapter.params(), tokens), own)
    params = dict(adapter.params())
    params["blocks.1.attn.W_O"] = params["blocks.1.attn.W_O"].clone()
    params["blocks.1.attn.W_O"][2] = 0.0
    grad = _restricted_grad(adapter, params, "L1H2", tokens)
    for p in ("W_Q", "W_K", "b_Q", "b_K"):
        assert torch.all(grad[f"blocks.1.attn.{p}"] == 0), p
    assert grad["blocks.1.attn.W_O"].abs().sum() > 0


def test_tl_model_saved_and_loaded_is_the_same_model(tmp_path):
    from susc_core.adapters.load import AdapterSpec, check_supported, load_adapter, load_adapter_tokenizer
    from susc_core.adapters.tl import TLAdapter, save_tl
    model = _hooked_transformer()
    spec = AdapterSpec("tl", str(save_tl(model, tmp_path / "tl")), loss_chunk_tokens=7)
    check_supported(spec)
    loaded, original = load_adapter(spec), TLAdapter(model, loss_chunk_tokens=7)
    assert loaded.component_names() == original.component_names()
    for k, v in original.params().items():
        assert torch.equal(loaded.params()[k], v), k
    tokens = _tokens()
    torch.testing.assert_close(loaded.per_token_loss(loaded.params(), tokens), original.per_token_loss(
        original.params(), tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"bundled tokenizer's 4096 ids do not fit the model's d_vocab=40"):
        load_adapter_tokenizer(spec)
    from susc_core.data.tokenizer import train_tokenizer
    train_tokenizer(["a tiny text"], 260).save(str(tmp_path / "tl" / "tokenizer.json"))
    assert load_adapter_tokenizer(spec).get_vocab_size() <= 260  # the directory's own tokenizer comes first


def test_tl_checkpoints_are_checked_before_loading(tmp_path):
    from susc_core.adapters.load import AdapterSpec, check_supported
    from susc_core.adapters.tl import CONFIG_FILE, WEIGHTS_FILE, save_tl
    directory = save_tl(_hooked_transformer(), tmp_path / "tl")
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no weights at"):
        check_supported(AdapterSpec("tl", str(directory)))
    (directory / CONFIG_FILE).write_text('{"n_layers": 1, "d_model": 8, "n_ctx": 4, "d_head": 2, "n_heds": 4}')
    with pytest.raises(ValueError, match="not a valid HookedTransformerConfig.*n_heds"):
        check_supported(AdapterSpec("tl", str(directory)))
    (directory / CONFIG_FILE).write_text('{"n_layers": 1, "d_model": 8, "n_ctx": 4, "d_head": 2, "n_heads": 4}')
    with pytest.raises(ValueError, match="gives no d_vocab"):
        check_supported(AdapterSpec("tl", str(directory)))
    with pytest.raises(FileNotFoundError, match="no TransformerLens config"):
        check_supported(AdapterSpec("tl", str(tmp_path)))


def test_tl_grouped_query_heads():
    from susc_core.adapters.tl import TLAdapter
    model = _hooked_transformer(n_key_value_heads=N_KV)
    qo = 2 * D_MODEL * D_HEAD + D_HEAD  # W_Q, W_O, b_Q
    kv = 2 * (D_MODEL * D_HEAD + D_HEAD)  # the KV group's W_K, W_V, b_K, b_V
    assert _count(TLAdapter(model), "L1H3") == qo + kv
    assert _count(TLAdapter(model, shared_kv=False), "L1H3") == qo


UNSUPPORTED = {"bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=1, hidden_size=16, n_head=4)),
               "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=1, n_embd=16, n_head=4, rotary_dim=2))}


@pytest.mark.parametrize("model_type", sorted(UNSUPPORTED))
def test_unsupported_architecture_is_refused_from_its_config_alone(model_type, tmp_path):
    """The weights file is deleted after saving: the refusal cannot have read a weight."""
    from susc_core.adapters.hf import SUPPORTED, load_hf
    from susc_core.adapters.load import AdapterSpec, check_supported
    config_name, model_name, kwargs = UNSUPPORTED[model_type]
    getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=VOCAB, **kwargs)).save_pretrained(
        tmp_path)
    (tmp_path / "model.safetensors").unlink()
    message = rf"model_type '{model_type}' is not supported; supported model types: {', '.join(SUPPORTED)}"
    with pytest.raises(ValueError, match=message):
        check_supported(AdapterSpec("hf", str(tmp_path)))
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path)


def test_soft_capped_logits_are_refused_and_a_supported_config_passes_without_weights(tmp_path):
    from susc_core.adapters.hf import HFAdapter
    from susc_core.adapters.load import AdapterSpec, check_supported
    cfg = transformers.Gemma2Config(num_hidden_layers=1, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                                    num_key_value_heads=N_KV, head_dim=D_HEAD, intermediate_size=D_MLP,
                                    vocab_size=VOCAB)
    assert cfg.final_logit_softcapping is not None  # Gemma-2's default, as in every released checkpoint
    cfg.save_pretrained(tmp_path / "gemma2")
    with pytest.raises(ValueError, match=r"'gemma2' with final_logit_softcapping=30.0 is not supported"):
        check_supported(AdapterSpec("hf", str(tmp_path / "gemma2")))
    with pytest.raises(ValueError, match="soft-caps its logits"):
        HFAdapter(transformers.Gemma2ForCausalLM(cfg))
    family_adapter("gpt_neox").module.config.save_pretrained(tmp_path / "neox")  # config only, no weights
    check_supported(AdapterSpec("hf", str(tmp_path / "neox")))
