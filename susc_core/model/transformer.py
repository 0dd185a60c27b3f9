"""A small transformer in TransformerLens layout, written as a pure function of its parameters.

Parameters live in a flat dict keyed by TransformerLens names (``blocks.{l}.attn.W_Q`` ...), so a head
is an index into ``W_Q [n_heads, d_model, d_head]`` and ``torch.func.functional_call`` / ``vmap`` can
swap or stack them. Positions are *shortformer* (TransformerLens): the learned positional embedding is
added to the residual before ``ln1`` on the query/key path only, ``ln1(resid + pos)``, while values
read ``ln1(resid)``; positions never enter the residual stream.

Named hook points (TransformerLens names) let callers read or edit activations: ``hook_names(cfg)``
lists them, ``hook_name(point, layer)`` builds one (``HOOK_POINTS``: ``hook_embed``,
``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_pattern`` [batch, head, q, k],
``blocks.{l}.attn.hook_z`` [batch, pos, head, d_head], ``blocks.{l}.hook_attn_out``,
``blocks.{l}.hook_mlp_out``, ``blocks.{l}.hook_resid_post``, ``ln_final.hook_normalized``); the forward
refuses a hook name the model does not have.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from susc_core.model.chunked_nll import chunked_nll

Params = dict[str, torch.Tensor]
Hooks = Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
# token rows of vocabulary logits held at once when a caller names none: bounds memory, never changes a loss
# (a speed setting, so not part of ModelConfig: a study passes its model.loss_chunk_tokens)
LOSS_CHUNK_TOKENS = 2048


@dataclass
class ModelConfig:
    """Shapes of the model; names follow TransformerLens' HookedTransformerConfig.

    Not frozen so that Hydra can use it as a structured config; treat instances as values."""

    n_layers: int = 2
    n_heads: int = 8
    d_head: int = 16
    d_model: int = 128
    n_ctx: int = 128  # longest context the positional embedding covers
    d_vocab: int = 4096
    d_mlp: int = 0  # 0 means attention-only (the paper's model); >0 adds a GELU MLP per block
    ln_eps: float = 1e-5
    init_std: float = 0.02  # std of the normal init of every weight matrix except the token embedding
    embed_init_std: float = 1.0  # std of W_E's init (torch's nn.Embedding default); with 0.02 no induction
    # head formed in the curriculum of docs/TRAINING.md (measured: README, "The bundled model and data")

    def to_dict(self) -> dict:
        return asdict(self)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in forward order."""
    h, dm, dh = cfg.n_heads, cfg.d_model, cfg.d_head
    shapes: dict[str, tuple[int, ...]] = {
        "embed.W_E": (cfg.d_vocab, dm),
        "pos_embed.W_pos": (cfg.n_ctx, dm),
    }
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}"
        shapes |= {
            f"{p}.ln1.w": (dm,), f"{p}.ln1.b": (dm,),
            f"{p}.attn.W_Q": (h, dm, dh), f"{p}.attn.W_K": (h, dm, dh),
            f"{p}.attn.W_V": (h, dm, dh), f"{p}.attn.W_O": (h, dh, dm),
            f"{p}.attn.b_Q": (h, dh), f"{p}.attn.b_K": (h, dh), f"{p}.attn.b_V": (h, dh),
            f"{p}.attn.b_O": (dm,),
        }
        if cfg.d_mlp > 0:
            shapes |= {
                f"{p}.ln2.w": (dm,), f"{p}.ln2.b": (dm,),
                f"{p}.mlp.W_in": (dm, cfg.d_mlp), f"{p}.mlp.b_in": (cfg.d_mlp,),
                f"{p}.mlp.W_out": (cfg.d_mlp, dm), f"{p}.mlp.b_out": (dm,),
            }
    shapes |= {
        "ln_final.w": (dm,), "ln_final.b": (dm,),
        "unembed.W_U": (dm, cfg.d_vocab), "unembed.b_U": (cfg.d_vocab,),
    }
    return shapes


def n_params(cfg: ModelConfig) -> int:
    """Total number of scalar parameters."""
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def init_params(cfg: ModelConfig, generator: torch.Generator) -> Params:
    """Fresh parameters: N(0, embed_init_std) token embedding, N(0, init_std) other matrices, zero
    biases, unit LayerNorm gains (fp32, CPU)."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[1]
        if leaf == "w":
            params[name] = torch.ones(shape)
        elif leaf.startswith("b"):
            params[name] = torch.zeros(shape)
        else:
            std = cfg.embed_init_std if name == "embed.W_E" else cfg.init_std
            params[name] = torch.randn(shape, generator=generator) * std
    return params


HOOK_POINTS = {"embed": "hook_embed", "resid_pre": "blocks.{layer}.hook_resid_pre",
               "pattern": "blocks.{layer}.attn.hook_pattern", "z": "blocks.{layer}.attn.hook_z",
               "attn_out": "blocks.{layer}.hook_attn_out", "mlp_out": "blocks.{layer}.hook_mlp_out",
               "resid_post": "blocks.{layer}.hook_resid_post", "normalized": "ln_final.hook_normalized"}


def hook_name(point: str, layer: int | None = None) -> str:
    """The hook name of ``point`` (a key of ``HOOK_POINTS``) in ``layer`` (per-layer points only)."""
    if point not in HOOK_POINTS:
        raise ValueError(f"unknown hook point {point!r}; valid: {sorted(HOOK_POINTS)}")
    template = HOOK_POINTS[point]
    if ("{layer}" in template) != (layer is not None):
        raise ValueError(f"hook point {point!r} {'needs' if '{layer}' in template else 'takes no'} layer")
    return template.format(layer=layer)


def hook_names(cfg: ModelConfig) -> list[str]:
    """Every hook point of a model in forward order (no ``mlp_out`` in an attention-only model)."""
    per_layer = [p for p in ("resid_pre", "pattern", "z", "attn_out", "mlp_out", "resid_post")
                 if p != "mlp_out" or cfg.d_mlp > 0]
    return ([hook_name("embed")] + [hook_name(p, l) for l in range(cfg.n_layers) for p in per_layer]
            + [hook_name("normalized")])


def check_hooks(cfg: ModelConfig, hooks: Hooks | None) -> None:
    """Raise if ``hooks`` names a hook point the model does not have (a typo would silently do nothing)."""
    if hooks and (unknown := set(hooks) - set(hook_names(cfg))):
        raise ValueError(f"unknown hook name(s) {sorted(unknown)}; this model's hook points: {hook_names(cfg)}")


def _hook(hooks: Hooks | None, name: str, x: torch.Tensor) -> torch.Tensor:
    return hooks[name](x) if hooks and name in hooks else x


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis: (x - mean) / sqrt(var + eps) * w + b."""
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def attention_inputs(params: Params, cfg: ModelConfig, layer: int, resid: torch.Tensor,
                     pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shortformer inputs of one attention layer, as in TransformerLens.

    resid: [batch, pos, d_model]; pos: [pos, d_model]. Returns (x_qk, x_v): ln1(resid + pos) feeds
    the queries and keys, ln1(resid) the values; positions never enter the residual stream.
    """
    w, b = params[f"blocks.{layer}.ln1.w"], params[f"blocks.{layer}.ln1.b"]
    return layer_norm(resid + pos, w, b, cfg.ln_eps), layer_norm(resid, w, b, cfg.ln_eps)


def head_projection(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every head's projection of x [..., pos, d_model] by w [n_heads, d_model, d_head] plus b [n_heads, d_head]:
    one matmul with the bias in it, returned as [..., n_heads, pos, d_head] (a view)."""
    h, d, e = w.shape
    y = F.linear(x, w.permute(0, 2, 1).reshape(h * e, d), b.reshape(h * e))
    return y.unflatten(-1, (h, e)).transpose(-3, -2)


def attention(params: Params, cfg: ModelConfig, layer: int, x_qk: torch.Tensor, x_v: torch.Tensor,
              hooks: Hooks | None = None) -> torch.Tensor:
    """Causal multi-head attention of one layer.

    x_qk: [batch, pos, d_model] query/key input, x_v: [batch, pos, d_model] value input (see
    :func:`attention_inputs`). Returns the layer's output [batch, pos, d_model]. The pattern is formed
    explicitly only when a ``hook_pattern`` hook asks for it; otherwise the fused causal kernel
    (``scaled_dot_product_attention``) computes the same z.
    """
    p, pattern_hook = f"blocks.{layer}.attn", hook_name("pattern", layer)
    q = head_projection(x_qk, params[f"{p}.W_Q"], params[f"{p}.b_Q"])
    k = head_projection(x_qk, params[f"{p}.W_K"], params[f"{p}.b_K"])
    v = head_projection(x_v, params[f"{p}.W_V"], params[f"{p}.b_V"])
    if hooks and pattern_hook in hooks:
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.d_head)
        n = x_v.shape[-2]
        causal = torch.ones(n, n, dtype=torch.bool, device=x_v.device).tril()
        pattern = hooks[pattern_hook](scores.masked_fill(~causal, float("-inf")).softmax(dim=-1))
        z = pattern @ v
    else:
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    z = _hook(hooks, hook_name("z", layer), z.transpose(-3, -2))  # [batch, pos, head, d_head]
    w_o = params[f"{p}.W_O"]  # [head, d_head, d_model]
    return F.linear(z.flatten(-2), w_o.reshape(-1, w_o.shape[-1]).T, params[f"{p}.b_O"])


def explicit_pattern_hooks(cfg: ModelConfig) -> Hooks:
    """Identity ``hook_pattern`` hooks on every layer: attention then forms its pattern explicitly, which
    ``torch.func.vmap`` can batch (the fused SDPA kernels have no batching rule, and CUDA's backward
    fails under vmap's fallback)."""
    return {hook_name("pattern", l): lambda pattern: pattern for l in range(cfg.n_layers)}


def mlp(params: Params, layer: int, x_norm: torch.Tensor) -> torch.Tensor:
    """GELU MLP of one block: [batch, pos, d_model] -> [batch, pos, d_model]."""
    p = f"blocks.{layer}.mlp"
    hidden = F.gelu(x_norm @ params[f"{p}.W_in"] + params[f"{p}.b_in"])
    return hidden @ params[f"{p}.W_out"] + params[f"{p}.b_out"]


def block(params: Params, cfg: ModelConfig, layer: int, resid: torch.Tensor, pos: torch.Tensor,
          hooks: Hooks | None = None) -> torch.Tensor:
    """One transformer block: resid [batch, pos, d_model] -> resid_post [batch, pos, d_model]."""
    p = f"blocks.{layer}"
    resid = _hook(hooks, hook_name("resid_pre", layer), resid)
    x_qk, x_v = attention_inputs(params, cfg, layer, resid, pos)
    resid = resid + _hook(hooks, hook_name("attn_out", layer), attention(params, cfg, layer, x_qk, x_v, hooks))
    if cfg.d_mlp > 0:
        x_norm = layer_norm(resid, params[f"{p}.ln2.w"], params[f"{p}.ln2.b"], cfg.ln_eps)
        resid = resid + _hook(hooks, hook_name("mlp_out", layer), mlp(params, layer, x_norm))
    return _hook(hooks, hook_name("resid_post", layer), resid)


def embed(params: Params, tokens: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
    """Token embedding only (shortformer: no positions in the residual): [batch, pos] -> [batch, pos, d_model]."""
    return _hook(hooks, hook_name("embed"), params["embed.W_E"][tokens])


def final_norm(params: Params, cfg: ModelConfig, tokens: torch.Tensor,
               hooks: Hooks | None = None, start_layer: int = 0,
               resid: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised final residual [batch, pos, d_model] for input tokens [batch, pos].

    With ``resid`` given (the cached ``blocks.{start_layer}.hook_resid_pre``), the blocks before
    ``start_layer`` are skipped: their activations do not depend on later layers' weights. ``hooks``:
    {hook name: fn(activation) -> activation}; an unknown name raises (``check_hooks``).
    """
    check_hooks(cfg, hooks)
    n = tokens.shape[-1]
    if n > cfg.n_ctx:
        raise ValueError(f"context of {n} tokens exceeds the model's n_ctx={cfg.n_ctx}")
    pos = params["pos_embed.W_pos"][:n]
    if resid is None:
        resid = embed(params, tokens, hooks)
    for layer in range(start_layer, cfg.n_layers):
        resid = block(params, cfg, layer, resid, pos, hooks)
    x = layer_norm(resid, params["ln_final.w"], params["ln_final.b"], cfg.ln_eps)
    return _hook(hooks, hook_name("normalized"), x)


def logits(params: Params, cfg: ModelConfig, tokens: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
    """Full logits [batch, pos, d_vocab]; for small inputs and tests (losses use the chunked path)."""
    return final_norm(params, cfg, tokens, hooks) @ params["unembed.W_U"] + params["unembed.b_U"]


def per_token_loss(params: Params, cfg: ModelConfig, tokens: torch.Tensor, hooks: Hooks | None = None,
                   chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Per-token loss l_xy = -log p(y|x, w) in nats.

    tokens: [batch, seq] ids; position t predicts tokens[:, t+1]. Returns [batch, seq - 1]. chunk_tokens:
    token rows of vocabulary logits held at once (memory and speed only).
    """
    x = final_norm(params, cfg, tokens[:, :-1], hooks)
    return chunked_nll(x, params["unembed.W_U"].T, params["unembed.b_U"], tokens[:, 1:], chunk_tokens)


class Transformer(torch.nn.Module):
    """nn.Module holding the parameters under their TransformerLens names, for optimisers and
    ``torch.func.functional_call``. ``forward`` returns per-token losses [batch, seq - 1]."""

    def __init__(self, cfg: ModelConfig, params: Params):
        super().__init__()
        self.cfg = cfg
        missing = set(param_shapes(cfg)) ^ set(params)
        if missing:
            raise ValueError(f"parameters do not match the config; differing names: {sorted(missing)}")
        for name, shape in param_shapes(cfg).items():
            if tuple(params[name].shape) != shape:
                raise ValueError(f"parameter {name} has shape {tuple(params[name].shape)}, config expects {shape}")
            self._register(name, torch.nn.Parameter(params[name].detach().clone()))

    def _register(self, dotted: str, param: torch.nn.Parameter) -> None:
        module: torch.nn.Module = self
        *path, leaf = dotted.split(".")
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, param)

    def params(self) -> Params:
        """The live parameters as a flat name -> tensor dict."""
        return dict(self.named_parameters())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return per_token_loss(self.params(), self.cfg, tokens)
