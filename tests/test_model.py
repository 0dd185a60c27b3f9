"""Model shapes, parameter counts, shortformer positions and the chunked loss."""

import pytest
import torch
import torch.nn.functional as F

from susc_core.model.chunked_nll import chunked_nll
from dataclasses import replace

from susc_core.model.transformer import (ModelConfig, Transformer, final_norm, hook_name, hook_names, init_params,
                                         logits, n_params, param_shapes, per_token_loss)

TINY = ModelConfig(n_layers=2, n_heads=2, d_head=4, d_model=8, n_ctx=16, d_vocab=32)


def test_paper_config_has_exactly_the_papers_parameter_count():
    paper = ModelConfig(n_layers=2, n_heads=8, d_head=32, d_model=256, n_ctx=1024, d_vocab=5000)
    assert n_params(paper) == 3_355_016
    shapes = param_shapes(paper)
    assert shapes["unembed.W_U"] == (256, 5000) and shapes["unembed.b_U"] == (5000,)
    assert shapes["embed.W_E"] == (5000, 256)  # untied: a separate tensor from W_U


def test_transformerlens_names_and_shapes():
    shapes = param_shapes(ModelConfig(n_layers=1, n_heads=3, d_head=5, d_model=7, n_ctx=11, d_vocab=13, d_mlp=17))
    assert shapes["blocks.0.attn.W_Q"] == (3, 7, 5)
    assert shapes["blocks.0.attn.W_O"] == (3, 5, 7)
    assert shapes["blocks.0.attn.b_V"] == (3, 5)
    assert shapes["blocks.0.attn.b_O"] == (7,)
    assert shapes["blocks.0.mlp.W_in"] == (7, 17) and shapes["blocks.0.mlp.W_out"] == (17, 7)
    assert shapes["pos_embed.W_pos"] == (11, 7)
    module = Transformer(ModelConfig(d_mlp=4, n_ctx=8, d_vocab=16, d_model=8, d_head=2, n_heads=2),
                         init_params(ModelConfig(d_mlp=4, n_ctx=8, d_vocab=16, d_model=8, d_head=2, n_heads=2),
                                     torch.Generator().manual_seed(0)))
    assert sum(p.numel() for p in module.parameters()) == n_params(module.cfg)


def _random_params(cfg, seed=0):
    params = init_params(cfg, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    return {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in params.items()}


def test_positions_never_enter_the_residual_stream():
    params = _random_params(TINY)
    tokens = torch.randint(0, TINY.d_vocab, (3, 10))
    seen = {}
    hooks = {"blocks.0.hook_resid_pre": lambda x: seen.setdefault("resid", x)}
    final_norm(params, TINY, tokens, hooks)
    assert torch.equal(seen["resid"], params["embed.W_E"][tokens])


def test_positions_act_only_through_queries_and_keys():
    params = _random_params(TINY)
    tokens = torch.randint(0, TINY.d_vocab, (3, 10))
    moved = dict(params, **{"pos_embed.W_pos": params["pos_embed.W_pos"] + 1.0})
    assert not torch.allclose(logits(params, TINY, tokens), logits(moved, TINY, tokens))
    for layer in range(TINY.n_layers):  # no query/key weights: attention is uniform, positions vanish
        for name in ("W_Q", "W_K", "b_Q", "b_K"):
            key = f"blocks.{layer}.attn.{name}"
            params[key] = torch.zeros_like(params[key])
            moved[key] = params[key]
    torch.testing.assert_close(logits(params, TINY, tokens), logits(moved, TINY, tokens), rtol=0, atol=1e-6)


def test_attention_is_causal():
    params = _random_params(TINY)
    tokens = torch.randint(0, TINY.d_vocab, (2, 12))
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % TINY.d_vocab
    torch.testing.assert_close(logits(params, TINY, tokens)[:, :7], logits(params, TINY, changed)[:, :7])


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_chunked_loss_equals_torch_cross_entropy(chunk):
    cfg = TINY
    params = {k: v.requires_grad_() for k, v in _random_params(cfg).items()}
    tokens = torch.randint(0, cfg.d_vocab, (3, 9))
    ours = per_token_loss(params, cfg, tokens, chunk_tokens=chunk)
    ref = F.cross_entropy(logits(params, cfg, tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none")
    assert ours.shape == (3, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(ours.sum(), [params["unembed.W_U"], params["blocks.0.attn.W_Q"]])
    ref_grads = torch.autograd.grad(ref.sum(), [params["unembed.W_U"], params["blocks.0.attn.W_Q"]])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_nll_handles_arbitrary_leading_shape_and_gradients():
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    w, b = torch.randn(6, 11, requires_grad=True), torch.randn(11, requires_grad=True)
    t = torch.randint(0, 11, (2, 3, 4))
    upstream = torch.randn(2, 3, 4)  # a per-token weighting, so the backward is exercised token by token
    ref = F.cross_entropy((x @ w + b).reshape(-1, 11), t.reshape(-1), reduction="none").reshape(2, 3, 4)
    ours = chunked_nll(x, w.T, b, t, chunk_tokens=5)
    torch.testing.assert_close(ours, ref)
    for a, r in zip(torch.autograd.grad((ours * upstream).sum(), (x, w, b)),
                    torch.autograd.grad((ref * upstream).sum(), (x, w, b))):
        torch.testing.assert_close(a, r)


def test_context_longer_than_n_ctx_is_rejected():
    with pytest.raises(ValueError, match="n_ctx"):
        per_token_loss(_random_params(TINY), TINY, torch.zeros(1, TINY.n_ctx + 2, dtype=torch.long))


def test_mismatched_parameters_are_rejected_by_name():
    params = _random_params(TINY)
    del params["blocks.1.attn.W_V"]
    with pytest.raises(ValueError, match="blocks.1.attn.W_V"):
        Transformer(TINY, params)


@pytest.mark.parametrize("d_mlp", [0, 12])
def test_every_listed_hook_point_is_called_once_in_forward_order(d_mlp):
    cfg = replace(TINY, d_mlp=d_mlp)
    params = _random_params(cfg)
    called = []
    hooks = {name: (lambda x, name=name: called.append(name) or x) for name in hook_names(cfg)}
    tokens = torch.randint(0, cfg.d_vocab, (2, 6))
    torch.testing.assert_close(per_token_loss(params, cfg, tokens, hooks), per_token_loss(params, cfg, tokens))
    assert called == hook_names(cfg) and len(called) == 2 + cfg.n_layers * (5 + (d_mlp > 0))
    assert ("blocks.0.hook_mlp_out" in hook_names(cfg)) == (d_mlp > 0)


def test_an_unknown_hook_name_raises_with_the_valid_ones():
    params = _random_params(TINY)
    with pytest.raises(ValueError, match=r"unknown hook name\(s\) \['blocks.0.attn.hook_zz'\].*blocks.0.attn.hook_z"):
        per_token_loss(params, TINY, torch.randint(0, TINY.d_vocab, (2, 6)), {"blocks.0.attn.hook_zz": lambda x: x})
    with pytest.raises(ValueError, match="unknown hook point"):
        hook_name("attn", 0)
    with pytest.raises(ValueError, match="needs layer"):
        hook_name("z")
