"""Per-token NLL over the vocabulary for a stack of chains, fused and chunked (a custom autograd Function).

For chains i = 0 .. k-1 and tokens t the logits are

    logits_i[t] = scale_i[t] * (base_g[t] @ w_base + x_i[t] @ w_i) + beta          [d_vocab]

(``base`` term and ``scale`` optional; g = 0 when ``base``/``targets`` are shared, else g = i). The plain
unembedding is ``x = ln_final output, w = W_U, beta = b_U``; the low-rank path of a last-layer head is
``base = residual at w*, w_base = Wc, x = [z, z*], w = [W_O Wc; -W_O* Wc], scale = inv_sigma``.

Logits exist only for ``chunk_tokens`` rows at a time (a block that stays in cache) and are never
recomputed: while a chunk is hot the forward also contracts ``softmax - onehot`` into every gradient
the caller needs (the softmax normalisation, the scale and the one-hot part are applied to the small
results, so the [tokens, d_vocab] block sees no extra pass); the backward is a few multiplies and no
autograd graph is built over the vocabulary. Two outputs:

- per-token NLL ``[k, n]``: differentiable in ``x`` and ``scale`` (per-token Jacobians, exact for any
  upstream gradient); used for observables and wherever only activations move.
- per-chain mean NLL ``[k]`` (``mean=True``): differentiable in ``x``, ``w``, ``beta`` and ``scale``; the
  weight gradients are contractions over the chain's tokens, known in the forward because every token
  weighs 1/n. This is the SGLD step's loss: a chain moving W_U, or a last-layer head moving its
  rank-2·d_head basis, gets its weight gradient from the forward's one pass over the logits.

The shared term ``base @ w_base`` of a chunk is computed once and reused by every chain.
"""

from __future__ import annotations

import torch


def _chunk_pre(base_c, x_c, w_i, i, g):
    """Pre-scale logits [c, V] of chain i on one chunk (base_c: [G, c, V] products, or None)."""
    return x_c[i] @ w_i if base_c is None else torch.addmm(base_c[g], x_c[i], w_i)


def _logits(pre, scale_c, beta, i, keep_pre):
    """Logits [c, V] from the pre-scale ones, in place unless ``keep_pre``."""
    if scale_c is None:
        return pre + beta if keep_pre else pre.add_(beta)
    return torch.addcmul(beta, pre, scale_c[i, :, None]) if keep_pre else pre.mul_(scale_c[i, :, None]).add_(beta)


class FusedNLL(torch.autograd.Function):
    """See the module docstring; call through ``fused_nll``."""

    @staticmethod
    def forward(ctx, x, w, beta, scale, base, w_base, targets, chunk_tokens, mean):
        k, n, _ = x.shape
        need_x, need_w, need_beta, need_scale = ctx.needs_input_grad[:4]
        if (need_w or need_beta) and not mean:
            raise ValueError("fused_nll: per-token losses are differentiable in x and scale only; "
                             "pass mean=True to differentiate w or beta")
        acc = torch.promote_types(x.dtype, torch.float32)  # losses and sums stay >= fp32 under bf16 autocast
        nll = x.new_empty(k, n, dtype=acc)
        jac_x = torch.empty_like(x) if need_x else None  # d out / d x, formed while the chunk is hot
        jac_scale = torch.empty_like(scale) if need_scale else None
        grad_w = x.new_zeros(k, *w.shape[1:], dtype=acc) if need_w else None  # per chain, reduced in the backward
        grad_beta = x.new_zeros(k, beta.shape[0], dtype=acc) if need_beta else None
        for s in range(0, n, chunk_tokens):
            c = slice(s, min(s + chunk_tokens, n))
            base_c = None if base is None else base[:, c] @ w_base
            scale_c = None if scale is None else scale[:, c]
            for i in range(k):
                g = 0 if len(targets) == 1 else i
                w_i, t_c = w[0 if len(w) == 1 else i], targets[g, c]
                pre = _chunk_pre(base_c, x[:, c], w_i, i, g)
                logits = _logits(pre, scale_c, beta, i, keep_pre=need_scale)
                picked = logits.gather(1, t_c[:, None]).squeeze(1)
                top = logits.amax(dim=1)
                expo = logits.sub_(top[:, None]).exp_()  # E = exp(logits - top), in place
                total = expo.sum(dim=1)
                nll[i, c] = total.log().add_(top).sub_(picked)
                if not (need_x or need_w or need_beta or need_scale):
                    continue
                # d nll / d logits = diag(1/total) E - onehot(t); d / d pre adds the row scale s. The row
                # factors and the one-hot part are applied to the small [c, r] / [r, V] results, never
                # as passes over the [c, V] block.
                inv_total = total.reciprocal()
                row = inv_total if scale_c is None else inv_total * scale_c[i]  # rows of E in d / d pre
                hot = None if scale_c is None else scale_c[i]  # rows of the one-hot part in d / d pre
                if need_beta:
                    grad_beta[i] += inv_total @ expo
                    grad_beta[i].index_add_(0, t_c, grad_beta.new_full((len(t_c),), -1.0))
                if need_scale:
                    pre_t = pre.gather(1, t_c[:, None]).squeeze(1)
                    jac_scale[i, c] = pre.mul_(expo).sum(dim=1).mul_(inv_total).sub_(pre_t)  # pre not needed again
                if need_x:
                    onehot_x = w_i[:, t_c].T if hot is None else w_i[:, t_c].T * hot[:, None]
                    jac_x[i, c] = (expo @ w_i.T).mul_(row[:, None]).sub_(onehot_x)
                if need_w:
                    x_c = x[i, c]
                    grad_w[i] += (x_c * row[:, None]).T @ expo  # out of place: autocast may hand bf16 here
                    grad_w[i].index_add_(1, t_c, -(x_c if hot is None else x_c * hot[:, None]).T.to(grad_w.dtype))
        if mean:
            nll = nll.mean(dim=1)
            for t in (jac_x, jac_scale, grad_w, grad_beta):
                if t is not None:
                    t.div_(n)
        ctx.mean, ctx.w_shared, ctx.w_dtype, ctx.beta_dtype = mean, len(w) == 1, w.dtype, beta.dtype
        ctx.save_for_backward(jac_x, jac_scale, grad_w, grad_beta)
        return nll

    @staticmethod
    def backward(ctx, grad_out):
        jac_x, jac_scale, grad_w, grad_beta = ctx.saved_tensors
        per_token = grad_out if not ctx.mean else grad_out[:, None]  # [k, n] or [k, 1]
        grad_x = None if jac_x is None else jac_x * per_token[..., None]
        grad_scale = None if jac_scale is None else jac_scale * per_token
        if grad_w is not None:
            grad_w = grad_w * grad_out[:, None, None]
            grad_w = (grad_w.sum(dim=0, keepdim=True) if ctx.w_shared else grad_w).to(ctx.w_dtype)
        if grad_beta is not None:
            grad_beta = (grad_beta * grad_out[:, None]).sum(dim=0).to(ctx.beta_dtype)
        return grad_x, grad_w, grad_beta, grad_scale, None, None, None, None, None


def fused_nll(x: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
              scale: torch.Tensor | None = None, base: torch.Tensor | None = None,
              w_base: torch.Tensor | None = None, mean: bool = False) -> torch.Tensor:
    """NLL (nats) of the logits in the module docstring: per token [k, n], or each chain's mean [k] (``mean``).

    x: [k, n, r]; w: [1 or k, r, V]; beta: [V]; targets: [1 or k, n] token ids; scale: [k, n] or None;
    base: [1 or k, n, d] (as many rows as targets) with w_base [d, V], constants, or both None.
    chunk_tokens: rows of logits held at once (per chain). Per-token output is differentiable in x and
    scale; the mean also in w and beta. Losses and weight gradients are accumulated in at least fp32.
    """
    if (base is None) != (w_base is None):
        raise ValueError("fused_nll: pass base and w_base together, or neither")
    if chunk_tokens < 1:
        raise ValueError(f"fused_nll: chunk_tokens must be >= 1, got {chunk_tokens}")
    if base is not None and len(base) != len(targets):
        raise ValueError(f"fused_nll: base has {len(base)} rows and targets {len(targets)}; pass one row each "
                         f"(shared) or one per chain")
    if base is not None and torch.is_grad_enabled() and (base.requires_grad or w_base.requires_grad):
        raise ValueError("fused_nll: base and w_base are constants (values at w*); detach them")
    if not torch.is_grad_enabled():  # nothing will be differentiated: form no Jacobians
        x, w, beta = x.detach(), w.detach(), beta.detach()
        scale = None if scale is None else scale.detach()
    return FusedNLL.apply(x, w, beta, scale, base, w_base, targets, chunk_tokens, mean)
