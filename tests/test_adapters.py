"""Adapters for real models: masks count exactly a component's parameters, losses equal the models' own,
and the adapter work unit reproduces the engine's statistics. Tiny random models built in-process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from susc_core.model import transformer as M
from susc_core.adapters.base import flat_indices, gather, scatter
from susc_core.model.chunked_nll import chunked_nll
from susc_core.adapters.bundled import BundledAdapter
from susc_core.adapters.engine import chains_per_pass_for_budget, AdapterGroup, run_adapter_unit
from susc_core.engine.sgld import SamplerConfig

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

D_MODEL, N_HEADS, N_KV, VOCAB, N_CTX = 16, 4, 2, 40, 12
D_HEAD = D_MODEL // N_HEADS


@pytest.fixture(scope="module")
def gpt2():
    from susc_core.adapters.hf import HFAdapter
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=D_MODEL, n_head=N_HEADS, vocab_size=VOCAB, n_positions=N_CTX,
                                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return HFAdapter(transformers.GPT2LMHeadModel(cfg), loss_chunk_tokens=7)


def _llama(shared_kv: bool):
    from susc_core.adapters.hf import HFAdapter
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                                   num_key_value_heads=N_KV, intermediate_size=24, vocab_size=VOCAB,
                                   max_position_embeddings=N_CTX, attention_bias=True,
                                   attn_implementation="eager")
    return HFAdapter(transformers.LlamaForCausalLM(cfg), loss_chunk_tokens=7, shared_kv=shared_kv)


@pytest.fixture(scope="module")
def llama():
    return _llama(shared_kv=True)


def _tokens(n=3, length=N_CTX, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _count(adapter, name):
    return sum(i.numel() for i in flat_indices(adapter.component_mask(name), adapter.params()).values())


def _indices(adapter, name):
    return {p: set(i.tolist()) for p, i in flat_indices(adapter.component_mask(name), adapter.params()).items()}


def _restricted_grad(adapter, params, name, tokens):
    """{param: grad on the component's coordinates} of the mean loss, restricted to component ``name``."""
    index = flat_indices(adapter.component_mask(name), params)
    w = gather(params, index).requires_grad_(True)
    grad = torch.autograd.grad(adapter.per_token_loss(scatter(params, index, w), tokens).mean(), w)[0]
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


def test_gpt2_head_mask_counts_and_partition(gpt2):
    assert _count(gpt2, "L1H2") == 3 * (D_MODEL * D_HEAD + D_HEAD) + D_HEAD * D_MODEL
    heads = [_indices(gpt2, f"L0H{h}") for h in range(N_HEADS)]
    for p in heads[0]:
        covered = [i for h in heads for i in h[p]]
        assert len(covered) == len(set(covered))  # heads are disjoint
    layer = gpt2.params()
    assert sum(len(h["transformer.h.0.attn.c_attn.weight"]) for h in heads) == layer[
        "transformer.h.0.attn.c_attn.weight"].numel()
    assert _count(gpt2, "embed") == VOCAB * D_MODEL and _count(gpt2, "pos_embed") == N_CTX * D_MODEL
    assert gpt2.component_mask("unembed") == gpt2.component_mask("embed")  # GPT-2 ties them
    assert _count(gpt2, "full") == sum(p.numel() for p in gpt2.module.parameters())


def test_llama_gqa_head_masks(llama):
    group_size = N_HEADS // N_KV
    qo = 2 * D_MODEL * D_HEAD + D_HEAD  # q rows + q bias + o columns
    kv = 2 * (D_HEAD * D_MODEL + D_HEAD)  # k and v rows + biases of the KV group
    assert _count(llama, "L1H3") == qo + kv
    assert _count(_llama(shared_kv=False), "L1H3") == qo
    a, b, c = (_indices(llama, f"L0H{h}") for h in (0, group_size - 1, group_size))
    k = "model.layers.0.self_attn.k_proj.weight"
    assert a[k] == b[k] and not a[k] & c[k]  # same KV group shares k, the next group does not
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not a[q] & b[q]


def _zero_output(adapter, params, layer, heads):
    params = dict(params)
    for h in heads:
        for p, index in adapter.head_mask(layer, h).items():
            if p.endswith(("c_proj.weight", "o_proj.weight")):
                params[p] = params[p].clone()
                params[p][index] = 0.0
    return params


def test_zeroed_head_output_gives_zero_query_key_gradient(gpt2, llama):
    tokens = _tokens()
    grad = _restricted_grad(gpt2, _zero_output(gpt2, gpt2.params(), 1, [2]), "L1H2", tokens)
    cols = grad["transformer.h.1.attn.c_attn.weight"].view(D_MODEL, 3, D_HEAD)
    assert torch.all(cols == 0) and torch.all(grad["transformer.h.1.attn.c_attn.bias"] == 0)
    assert grad["transformer.h.1.attn.c_proj.weight"].abs().sum() > 0

    attn = "model.layers.1.self_attn"
    grad = _restricted_grad(llama, _zero_output(llama, llama.params(), 1, [0]), "L1H0", tokens)
    assert torch.all(grad[f"{attn}.q_proj.weight"] == 0) and torch.all(grad[f"{attn}.q_proj.bias"] == 0)
    assert grad[f"{attn}.k_proj.weight"].abs().sum() > 0  # head 1 of the same KV group still reads these keys
    grad = _restricted_grad(llama, _zero_output(llama, llama.params(), 1, [0, 1]), "L1H0", tokens)
    assert torch.all(grad[f"{attn}.k_proj.weight"] == 0) and torch.all(grad[f"{attn}.v_proj.weight"] == 0)


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_per_token_loss_equals_model_loss(which, request):
    adapter = request.getfixturevalue(which)
    tokens = _tokens()
    ours = adapter.per_token_loss(adapter.params(), tokens)
    with torch.no_grad():
        out = adapter.module(tokens, labels=tokens)
    own = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
    assert ours.shape == (3, N_CTX - 1)
    torch.testing.assert_close(ours.reshape(-1), own)
    torch.testing.assert_close(ours.mean(), out.loss)


def test_unknown_component_and_globs(llama):
    with pytest.raises(ValueError, match=r"unknown component 'L9H0'.*valid names: L0H0, L0H1"):
        run_adapter_unit(llama, ["L9H0"], [0], SamplerConfig(1e-3, 10, 100), _tokens(), _tokens(), _tokens(),
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
    group = run_adapter_unit(llama, ["L1H1", "L0.mlp"], [0, 1, 2], _sampler(), train, obs, probe, seed=5, device=device)
    alone = run_adapter_unit(llama, ["L0.mlp"], [1], _sampler(), train, obs, probe, seed=5, device=device)
    _assert_same_stats(group["L0.mlp", 1], alone["L0.mlp", 1])
    assert group["L1H1", 0].count == 3 and np.any(group["L1H1", 0].g_trace != 0)
    assert not np.allclose(group["L1H1", 0].g_trace, group["L1H1", 1].g_trace)  # distinct noise streams


def test_memory_budget_chunks_chains_without_changing_results(gpt2):
    train, obs, probe = _contexts()
    params = gpt2.params()
    index = flat_indices(gpt2.component_mask("L0H1"), params)
    group = AdapterGroup(gpt2, params, index)
    w_star, batch = gather(params, index), train[:4].unsqueeze(0)
    fit_big = chains_per_pass_for_budget(group, w_star, batch, memory_budget_mib=1e3)
    assert fit_big > 3
    with pytest.raises(ValueError, match="memory_budget_mib=1e-06 is below"):
        chains_per_pass_for_budget(group, w_star, batch, memory_budget_mib=1e-6)
    whole = run_adapter_unit(gpt2, ["L0H1"], [0, 1], _sampler(n_draws=2), train, obs, probe, seed=2)
    split = run_adapter_unit(gpt2, ["L0H1"], [0, 1], _sampler(n_draws=2, chains_per_pass=1), train, obs, probe,
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
    ours = run_adapter_unit(adapter, names, [0, 1], _sampler(), train, obs, probe, seed=3)
    engine = run_unit(cfg, w_star, names, [0, 1], _sampler(), train, obs, probe, seed=3, chunk_tokens=16)
    assert set(ours) == set(engine)
    for key in engine:
        _assert_same_stats(ours[key], engine[key], atol=2e-6)


def test_bfloat16_forward_keeps_fp32_reference(llama, device):
    train, obs, probe = _contexts()
    fp32 = run_adapter_unit(llama, ["L1H0"], [0], _sampler(), train, obs, probe, seed=1, device=device)
    bf16 = run_adapter_unit(llama, ["L1H0"], [0], _sampler(forward_dtype="bfloat16"), train, obs, probe, seed=1,
                            device=device)
    a, b = fp32["L1H0", 0], bf16["L1H0", 0]
    assert a.loss_star == b.loss_star and np.all(np.isfinite(b.g_trace))
    assert np.abs(a.g_trace - b.g_trace).max() < 0.05 * max(np.abs(a.g_trace).max(), 1e-3) + 1e-3


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_per_token_loss_on_the_device_equals_the_cpu(which, device, request):
    """Parameters and tokens on ``device``: the module's buffers follow them (the module stays put)."""
    adapter = request.getfixturevalue(which)
    tokens = _tokens()
    on_device = adapter.per_token_loss({k: v.to(device) for k, v in adapter.params().items()}, tokens.to(device))
    assert on_device.device.type == torch.device(device).type
    torch.testing.assert_close(on_device.cpu(), adapter.per_token_loss(adapter.params(), tokens), rtol=1e-5, atol=1e-5)
    assert next(adapter.module.parameters()).device.type == "cpu"


def test_tl_adapter():
    tl = pytest.importorskip("transformer_lens", reason="the [tl] extra (transformer-lens 3.x) is not installed")
    from susc_core.adapters.tl import TLAdapter
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_heads=N_HEADS, d_head=D_HEAD, n_ctx=N_CTX,
                                     d_vocab=VOCAB, d_mlp=24, act_fn="gelu", normalization_type="LN", seed=0)
    adapter = TLAdapter(tl.HookedTransformer(cfg), loss_chunk_tokens=7)
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


LLAMA_LIKE_FAMILIES = {  # family -> (config, model, q/k/v biases)
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", False),
    "mistral": ("MistralConfig", "MistralForCausalLM", False),
}


@pytest.mark.parametrize("family", sorted(LLAMA_LIKE_FAMILIES))
def test_other_gqa_families(family):
    """Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms, shared by the heads) and Mistral: the head mask
    holds exactly its q rows, o columns and its KV group's k/v rows (and biases); the loss is the
    model's own; a head whose output slice is zeroed gets no query gradient."""
    from susc_core.adapters.hf import HFAdapter
    config_name, model_name, bias = LLAMA_LIKE_FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(num_hidden_layers=2, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                                             num_key_value_heads=N_KV, head_dim=D_HEAD, intermediate_size=24,
                                             vocab_size=VOCAB, max_position_embeddings=N_CTX,
                                             attn_implementation="eager")
    adapter = HFAdapter(getattr(transformers, model_name)(cfg), loss_chunk_tokens=7)
    per_proj = D_HEAD * D_MODEL + (D_HEAD if bias else 0)
    assert _count(adapter, "L1H3") == 3 * per_proj + D_HEAD * D_MODEL  # q, k, v rows (+ biases), o columns
    if family == "qwen3":  # per-head norms are shared by every head: the layer's, not a head's
        norms = {p for p in adapter.params() if "q_norm" in p or "k_norm" in p}
        assert norms and not norms & set(adapter.component_mask("L1H3"))
    tokens = _tokens()
    with torch.no_grad():
        out = adapter.module(tokens)
    own = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(adapter.per_token_loss(adapter.params(), tokens).reshape(-1), own)
    grad = _restricted_grad(adapter, _zero_output(adapter, adapter.params(), 1, [0]), "L1H0", tokens)
    assert torch.all(grad["model.layers.1.self_attn.q_proj.weight"] == 0)
    assert grad["model.layers.1.self_attn.o_proj.weight"].abs().sum() > 0
