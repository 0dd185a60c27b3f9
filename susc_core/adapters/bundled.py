"""The bundled model (``susc_core.model.transformer``) as a ``ModelAdapter``: the adapter path's reference point.

Components are exactly those of ``susc_core.model.components`` (same names, same coordinates, same order),
so ``run_adapter_unit`` on this adapter reproduces ``engine.run_unit``'s statistics.
"""

from __future__ import annotations

import torch

from susc_core.model import components as C
from susc_core.model import transformer as M
from .base import WHOLE, Mask


class BundledAdapter:
    """w_star: the checkpoint's parameters; cfg: its ``ModelConfig``; loss_chunk_tokens: token rows of
    vocabulary logits held at once (speed and memory only)."""

    def __init__(self, w_star: M.Params, cfg: M.ModelConfig, loss_chunk_tokens: int = M.LOSS_CHUNK_TOKENS):
        if missing := set(M.param_shapes(cfg)) ^ set(w_star):
            raise ValueError(f"w_star does not match cfg; differing parameter names: {sorted(missing)}")
        self.w_star, self.cfg = w_star, cfg
        self.d_vocab, self.n_ctx, self.loss_chunk_tokens = cfg.d_vocab, cfg.n_ctx, loss_chunk_tokens
        self.explicit_attention = M.explicit_pattern_hooks(cfg)  # run_adapter_unit vmaps this model

    def params(self) -> M.Params:
        """fp32 detached copies of every parameter, in ``param_shapes`` order."""
        return {k: self.w_star[k].detach().float().clone() for k in M.param_shapes(self.cfg)}

    def per_token_loss(self, params: M.Params, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, seq] -> [batch, seq-1] nats: the model's own loss, attention in its vmap-able form."""
        return M.per_token_loss(params, self.cfg, tokens, self.explicit_attention, self.loss_chunk_tokens)

    def component_names(self) -> list[str]:
        return C.valid_component_names(self.cfg)

    def component_mask(self, name: str) -> Mask:
        return {p: WHOLE if h is None else h for p, h in C.component(self.cfg, name).slices}
