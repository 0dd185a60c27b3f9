"""TransformerLens ``HookedTransformer`` models as ``ModelAdapter``s (optional extra ``[tl]``, transformer-lens 3.x;
4.x replaced ``HookedTransformer`` by ``TransformerBridge``).

The layout is already per head: ``L{l}H{h}`` = index ``[h]`` of ``W_Q``, ``W_K``, ``W_V``, ``W_O``,
``b_Q``, ``b_K``, ``b_V`` of ``blocks.{l}.attn`` (``b_O`` is shared by the layer, as in the bundled
model). With grouped-query attention (``n_key_value_heads``) TransformerLens stores ``_W_K``, ``_W_V``,
``_b_K``, ``_b_V`` per KV head; a head then includes the slices of its KV group
``h // (n_heads / n_key_value_heads)`` (shared with the other heads of the group), as in ``hf``.
Other names: ``L{l}``, ``L{l}.mlp`` (when not attention-only), ``embed``, ``pos_embed`` (learned
positions only), ``ln_final`` (when the model normalises), ``unembed``, ``full``.
"""

from __future__ import annotations

import torch

from .base import Mask, ModuleAdapter


class TLAdapter(ModuleAdapter):
    """model: a ``transformer_lens.HookedTransformer`` (read, never modified); loss_chunk_tokens: most token
    rows of vocabulary logits held at once. Build or load the model yourself (``from_pretrained`` needs
    the hub or a local cache)."""

    def __init__(self, model: torch.nn.Module, loss_chunk_tokens: int = 2048):
        super().__init__(model, loss_chunk_tokens)
        cfg = model.cfg
        self.n_layers, self.n_heads, self.has_mlp = cfg.n_layers, cfg.n_heads, not cfg.attn_only
        self.d_vocab, self.n_ctx = cfg.d_vocab, cfg.n_ctx
        self.group_size = cfg.n_heads // (getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)

    def block_prefix(self, layer: int) -> str:
        return f"blocks.{layer}."

    def mlp_prefix(self, layer: int) -> str:
        return f"blocks.{layer}.mlp."

    def named_params(self) -> dict[str, list[str]]:
        names = [n for n, _ in self.module.named_parameters()]
        out = {}
        for component in ("embed", "pos_embed", "ln_final", "unembed"):
            if owned := [n for n in names if n.startswith(f"{component}.")]:
                out[component] = owned
        return out

    def head_mask(self, layer: int, head: int) -> Mask:
        p = f"blocks.{layer}.attn"
        params = dict(self.module.named_parameters())
        mask: Mask = {}
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            if f"{p}.{name}" in params:
                mask[f"{p}.{name}"] = head
            elif f"{p}._{name}" in params:  # grouped-query attention: one slice per KV head
                mask[f"{p}._{name}"] = head // self.group_size
        return mask

    def final_hidden(self, tokens: torch.Tensor):
        m = self.module
        resid = m(tokens, stop_at_layer=self.n_layers)  # [batch, pos, d_model] before ln_final
        x = m.ln_final(resid) if hasattr(m, "ln_final") else resid
        return x, m.unembed.W_U.T, m.unembed.b_U
