"""Per-token loss of last-layer heads through their low-rank logit change (exact, no full unembedding per chain).

With h a head of the last block (and no MLP after it), the final residual of a chain is
``r = base + z W_O - z* W_O*`` where ``base`` is the residual at w* (shared by every chain), z the
head's mixed values [.., d_head] and W_O its output matrix. The final LayerNorm then unembedding is

    logits = inv_sigma(r) * (r @ Wc) + beta,   Wc = (I - 11^T / d_model) diag(w_ln) W_U,   beta = b_ln W_U + b_U

so ``r @ Wc = base @ Wc + [z, z*] @ [W_O Wc ; -W_O* Wc]``: one shared [tokens, d_vocab] product plus a
rank-2·d_head product per chain, with the per-token scale inv_sigma taken from r in d_model space.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.checkpoint import checkpoint

from .model import ModelConfig, Params


class FinalMap(NamedTuple):
    """Wc [d_model, d_vocab] and beta [d_vocab] of the module docstring (constants of w*)."""

    wc: torch.Tensor
    beta: torch.Tensor


def final_map(params: Params, cfg: ModelConfig) -> FinalMap:
    """The final LayerNorm folded into the unembedding (see module docstring)."""
    scaled = params["ln_final.w"][:, None] * params["unembed.W_U"]
    return FinalMap(scaled - scaled.mean(dim=0, keepdim=True),
                    params["ln_final.b"] @ params["unembed.W_U"] + params["unembed.b_U"])


def inv_sigma(resid: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(var(resid) + eps) over the last axis: [..., d_model] -> [...]."""
    return torch.rsqrt(resid.var(dim=-1, unbiased=False) + eps)


def _chunk_nll(zb, factors, basis, scale, beta, targets):
    logits = torch.addmm(zb, factors, basis) * scale[:, None] + beta
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked


def lowrank_nll(zb: torch.Tensor, factors: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor,
                beta: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Per-token NLL (nats) of ``logits = scale * (zb + factors @ basis) + beta`` for k chains.

    zb: [G, n, d_vocab] shared (G = 1) or per chain (G = k); factors: [k, n, r]; basis: [k, r, d_vocab];
    scale: [k, n]; beta: [d_vocab]; targets: [G, n]. Returns [k, n]. Logits are never held beyond
    ``chunk_tokens`` rows; under autograd each chunk is recomputed in the backward pass.
    """
    k, n = scale.shape
    out = []
    for i in range(k):
        g = 0 if zb.shape[0] == 1 else i
        pieces = []
        for s in range(0, n, chunk_tokens):
            c = slice(s, s + chunk_tokens)
            args = (zb[g, c], factors[i, c], basis[i], scale[i, c], beta, targets[g, c])
            pieces.append(checkpoint(_chunk_nll, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else _chunk_nll(*args))
        out.append(torch.cat(pieces))
    return torch.stack(out)
