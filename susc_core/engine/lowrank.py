"""The final LayerNorm folded into the unembedding, for the low-rank logit change of last-layer heads.

With h a head of the last block (and no MLP after it), the final residual of a chain is
``r = base + z W_O - z* W_O*`` where ``base`` is the residual at w* (shared by every chain), z the
head's mixed values [.., d_head] and W_O its output matrix. The final LayerNorm then unembedding is

    logits = inv_sigma(r) * (r @ Wc) + beta,   Wc = (I - 11^T / d_model) diag(w_ln) W_U,   beta = b_ln W_U + b_U

so ``r @ Wc = base @ Wc + [z, z*] @ [W_O Wc ; -W_O* Wc]``: one [tokens, d_vocab] product shared by every
chain plus a rank-2·d_head product per chain, with the per-token scale inv_sigma taken from r in d_model
space. ``fused_nll`` evaluates exactly this form (``base``, ``w_base = Wc``, ``scale = inv_sigma``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from susc_core.model.transformer import ModelConfig, Params


class FinalMap(NamedTuple):
    """Wc [d_model, d_vocab] and beta [d_vocab] of the module docstring (constants of w*)."""

    wc: torch.Tensor
    beta: torch.Tensor


def applies(cfg: ModelConfig, layer: int) -> bool:
    """Whether a head of ``layer`` has the low-rank logit change: it is in the last block and no MLP follows."""
    return layer == cfg.n_layers - 1 and cfg.d_mlp == 0


def final_map(params: Params, cfg: ModelConfig) -> FinalMap:
    """The final LayerNorm folded into the unembedding (see module docstring)."""
    scaled = params["ln_final.w"][:, None] * params["unembed.W_U"]
    return FinalMap(scaled - scaled.mean(dim=0, keepdim=True),
                    params["ln_final.b"] @ params["unembed.W_U"] + params["unembed.b_U"])


def inv_sigma(resid: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(var(resid) + eps) over the last axis: [..., d_model] -> [...]."""
    return torch.rsqrt(resid.var(dim=-1, unbiased=False) + eps)
