"""Per-token NLL over the vocabulary for a stack of chains, fused and chunked (a custom autograd Function).

For chains i = 0 .. k-1 and tokens t the logits are

    logits_i[t] = scale_i[t] * (base_g[t] @ w_base + x_i[t] @ w_i) + beta          [d_vocab]

(``base`` term and ``scale`` optional; g = 0 when ``base``/``targets`` are shared, else g = i). The plain
unembedding is ``x = ln_final output, w = W_U, beta = b_U``; the low-rank path of a last-layer head is
``base = residual at w*, w_base = Wc, x = [z, z*], w = [W_O Wc; -W_O* Wc], scale = inv_sigma``.

Logits exist only for ``chunk_tokens`` rows at a time (a block that stays in cache): the forward keeps the
per-token log-sum-exp, the backward recomputes a chunk's logits once and forms ``softmax - onehot`` in
place, so no [tokens, d_vocab] tensor is ever stored and no autograd graph is built over the vocabulary.
When only ``x`` needs a gradient (w, beta, scale fixed: a head's chains under a shared unembedding), the
forward forms ``(softmax - onehot) @ w^T`` per token while the chunk is in cache ([k, n, r], linear in
the per-token upstream gradient), so the backward is one multiply and the logits are never recomputed.
The shared term ``base @ w_base`` of a chunk is computed once and reused by every chain.
"""

from __future__ import annotations

import torch


def _chunk_pre(base_c, x_c, w, i, g):
    """Pre-scale logits [c, V] of chain i on one chunk (base_c: [G, c, V] products, or None)."""
    if base_c is None:
        return x_c[i] @ w[0 if len(w) == 1 else i]
    return torch.addmm(base_c[g], x_c[i], w[0 if len(w) == 1 else i])


def _logits(pre, scale_c, beta, i, keep_pre):
    """Logits [c, V] from the pre-scale ones, in place unless ``keep_pre``."""
    if scale_c is None:
        return pre + beta if keep_pre else pre.add_(beta)
    return torch.addcmul(beta, pre, scale_c[i, :, None]) if keep_pre else pre.mul_(scale_c[i, :, None]).add_(beta)


def _softmax_minus_onehot(probs, targets_c):
    """d nll / d logits [c, V] in place: probs minus the one-hot of targets_c [c]."""
    return probs.scatter_add_(1, targets_c[:, None], probs.new_full((len(targets_c), 1), -1.0))


class FusedNLL(torch.autograd.Function):
    """See the module docstring; call through ``fused_nll``."""

    @staticmethod
    def forward(ctx, x, w, beta, scale, base, w_base, targets, chunk_tokens):
        k, n, _ = x.shape
        nll = x.new_empty(k, n)
        lse = x.new_empty(k, n)
        need_x, need_w, need_beta, need_scale = ctx.needs_input_grad[:4]
        eager = need_x and not (need_w or need_beta or need_scale)
        jac_x = torch.empty_like(x) if eager else None  # d nll[i, t] / d x[i, t], formed while the chunk is hot
        for s in range(0, n, chunk_tokens):
            c = slice(s, min(s + chunk_tokens, n))
            base_c = None if base is None else base[:, c] @ w_base
            scale_c = None if scale is None else scale[:, c]
            for i in range(k):
                g = 0 if len(targets) == 1 else i
                logits = _logits(_chunk_pre(base_c, x[:, c], w, i, g), scale_c, beta, i, keep_pre=False)
                picked = logits.gather(1, targets[g, c, None]).squeeze(1)
                top = logits.amax(dim=1)
                total = logits.sub_(top[:, None]).exp_().sum(dim=1)
                lse[i, c] = total.log().add_(top)
                nll[i, c] = lse[i, c] - picked
                if eager:
                    dlogits = _softmax_minus_onehot(logits.div_(total[:, None]), targets[g, c])
                    if scale_c is not None:
                        dlogits.mul_(scale_c[i, :, None])
                    jac_x[i, c] = dlogits @ w[0 if len(w) == 1 else i].T
        ctx.eager = eager
        ctx.save_for_backward(*((jac_x,) if eager else (x, w, beta, scale, base, w_base, targets, lse)))
        ctx.chunk_tokens = chunk_tokens
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        if ctx.eager:
            return ctx.saved_tensors[0] * grad_nll[..., None], None, None, None, None, None, None, None
        x, w, beta, scale, base, w_base, targets, lse = ctx.saved_tensors
        need_x, need_w, need_beta, need_scale = ctx.needs_input_grad[:4]
        k, n, _ = x.shape
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_beta = torch.zeros_like(beta) if need_beta else None
        grad_scale = torch.zeros_like(scale) if need_scale else None
        for s in range(0, n, ctx.chunk_tokens):
            c = slice(s, min(s + ctx.chunk_tokens, n))
            base_c = None if base is None else base[:, c] @ w_base
            scale_c = None if scale is None else scale[:, c]
            for i in range(k):
                g = 0 if len(targets) == 1 else i
                pre = _chunk_pre(base_c, x[:, c], w, i, g)
                dlogits = _logits(pre, scale_c, beta, i, keep_pre=need_scale)
                dlogits = _softmax_minus_onehot(dlogits.sub_(lse[i, c, None]).exp_(), targets[g, c])
                dlogits.mul_(grad_nll[i, c, None])
                if need_beta:
                    grad_beta += dlogits.sum(dim=0)
                if need_scale:
                    grad_scale[i, c] = torch.einsum("cv,cv->c", dlogits, pre)
                if scale_c is not None:
                    dlogits.mul_(scale_c[i, :, None])
                if need_x:
                    grad_x[i, c] = dlogits @ w[0 if len(w) == 1 else i].T
                if need_w:
                    grad_w[0 if len(w) == 1 else i] += x[i, c].T @ dlogits
        return grad_x, grad_w, grad_beta, grad_scale, None, None, None, None


def fused_nll(x: torch.Tensor, w: torch.Tensor, beta: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
              scale: torch.Tensor | None = None, base: torch.Tensor | None = None,
              w_base: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token NLL [k, n] (nats) of the logits in the module docstring; differentiable in x, w, beta, scale.

    x: [k, n, r]; w: [1 or k, r, V]; beta: [V]; targets: [1 or k, n] token ids; scale: [k, n] or None;
    base: [1 or k, n, d] with w_base [d, V] (constants), or both None. chunk_tokens: rows of logits held
    at once (per chain).
    """
    if (base is None) != (w_base is None):
        raise ValueError("fused_nll: pass base and w_base together, or neither")
    if chunk_tokens < 1:
        raise ValueError(f"fused_nll: chunk_tokens must be >= 1, got {chunk_tokens}")
    if base is not None:  # constants: no gradient flows to them
        base, w_base = base.detach(), w_base.detach()
    return FusedNLL.apply(x, w, beta, scale, base, w_base, targets, chunk_tokens)
