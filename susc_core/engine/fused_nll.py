"""Per-token NLL over the vocabulary for a stack of chains, fused and chunked (a custom autograd Function).

For chains i = 0 .. k-1 and tokens t the logits are

    logits_i[t] = scale_i[t] * (base_g[t] @ w_base + x_i[t] @ w_i) + beta          [d_vocab]

(``base`` term and ``scale`` optional; g = 0 when ``base``/``targets`` are shared, else g = i). The plain
unembedding is ``x = ln_final output, w = W_U, beta = b_U``; the low-rank path of a last-layer head is
``base = residual at w*, w_base = Wc, x = [z, z*], w = [W_O Wc; -W_O* Wc], scale = inv_sigma``.

Logits exist only for ``chunk_tokens`` rows at a time and are never recomputed (``blocks``: whole
chains at once when they fit, few large launches for an accelerator; a cache-sized block of one chain's
tokens on a CPU): one fused log-softmax pass gives the losses, and while the block is hot the forward
also contracts ``softmax - onehot`` into every gradient the caller needs (the row scale and the one-hot
part are applied to the small results; the scale's Jacobian with a ``base`` adds one row dot of the block
with the shared base product); the backward is a few multiplies and no autograd graph is built over the
vocabulary. Two outputs:

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


def blocks(k: int, n: int, chunk_tokens: int) -> list[tuple[slice, slice]]:
    """(chains, tokens) blocks covering k chains x n tokens with at most ``chunk_tokens`` rows each, token
    range outermost: whole chains, as many as fit, when a chain's n tokens fit (few large launches on an
    accelerator), else ``chunk_tokens`` tokens of one chain (a cache-sized block on a CPU)."""
    if n <= chunk_tokens:
        per = chunk_tokens // n
        return [(slice(i, min(i + per, k)), slice(0, n)) for i in range(0, k, per)]
    return [(slice(i, i + 1), slice(s, min(s + chunk_tokens, n))) for s in range(0, n, chunk_tokens) for i in range(k)]


def _block_rows(t: torch.Tensor, chains: slice) -> torch.Tensor:
    """A block's rows of a per-chain tensor, or the shared one (leading axis 1) whole."""
    return t[:1] if len(t) == 1 else t[chains]


def _times_w(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [kb, c, m] times w [1 or kb, m, p] (+ bias [p], added by the matmul) -> [kb, c, p]; a shared w is
    one flat matmul."""
    if len(w) == 1:
        flat = a.reshape(-1, a.shape[-1])
        out = flat @ w[0] if bias is None else torch.addmm(bias, flat, w[0])
        return out.view(*a.shape[:2], w.shape[-1])
    return torch.bmm(a, w) if bias is None else torch.baddbmm(bias, a, w)


class FusedNLL(torch.autograd.Function):
    """See the module docstring; call through ``fused_nll``."""

    @staticmethod
    def forward(ctx, x, w, beta, scale, base, w_base, targets, chunk_tokens, mean):
        k, n, r = x.shape
        need_x, need_w, need_beta, need_scale = ctx.needs_input_grad[:4]
        if (need_w or need_beta) and not mean:
            raise ValueError("fused_nll: per-token losses are differentiable in x and scale only; "
                             "pass mean=True to differentiate w or beta")
        acc = torch.promote_types(x.dtype, torch.float32)  # losses and sums stay >= fp32 under bf16 autocast
        nll = x.new_empty(k, n, dtype=acc)
        jac_x = torch.empty_like(x) if need_x else None  # d out / d x, formed while the block is hot
        jac_scale = torch.empty_like(scale) if need_scale else None
        grad_w = x.new_zeros(k, *w.shape[1:], dtype=acc) if need_w else None  # per chain, reduced in the backward
        grad_beta = x.new_zeros(k, beta.shape[0], dtype=acc) if need_beta else None
        base_c, base_for = None, None  # a shared base's product for token range base_for, reused by its chains
        for ch, c in blocks(k, n, chunk_tokens):
            x_b, w_b = x[ch, c], _block_rows(w, ch)  # [kb, cb, r], [1 or kb, r, V]
            kb, cb = x_b.shape[:2]
            t_b = _block_rows(targets, ch)[:, c].expand(kb, cb)
            scale_b = None if scale is None else scale[ch, c, None]  # [kb, cb, 1]
            pre = _times_w(x_b, w_b, beta if scale_b is None else None)  # pre-scale logits [kb, cb, V] (+ beta)
            if base is not None and (len(base) > 1 or c != base_for):
                base_c, base_for = _times_w(_block_rows(base, ch)[:, c], w_base[None]), c
            if base is not None:
                pre += base_c
            if need_scale:  # the target's pre-scale logit, before pre becomes the logits in place
                pre_t = pre.gather(2, t_b[..., None])[..., 0]
            if scale_b is None:
                logits = pre
            else:  # in place unless autocast handed low-precision products
                logits = torch.addcmul(beta, pre, scale_b, out=pre if pre.dtype == acc else None)
            # one fused, row-local pass over the block; in place unless autocast handed low-precision logits
            in_place = logits.dtype == acc
            logp = torch.log_softmax(logits, 2, out=logits) if in_place else torch.log_softmax(logits, 2, dtype=acc)
            del logits, pre
            nll[ch, c] = logp.gather(2, t_b[..., None])[..., 0].neg_()
            if not (need_x or need_w or need_beta or need_scale):
                continue
            # d nll / d logits = P - onehot(t) (P = softmax); d / d pre scales both by s. The row scale and
            # the one-hot part are applied to the small [c, r] / [r, V] results, never as passes over the
            # [c, V] block.
            prob = logp.exp_()  # P, in place
            if need_beta:
                grad_beta[ch] += prob.sum(dim=1)
                grad_beta[ch].scatter_add_(1, t_b, torch.full(t_b.shape, -1.0, dtype=acc, device=t_b.device))
            if need_x or need_scale:
                w_t = w_b.transpose(1, 2)  # [1 or kb, V, r]
                prob_w = _times_w(prob, w_t)  # P @ w^T [kb, cb, r]
            if need_scale:  # sum_v P_v pre_v - pre_t with pre = base_c + x w: the x w part is x . (P @ w^T)
                jac_scale[ch, c] = torch.einsum("kcr,kcr->kc", x_b.to(prob_w.dtype), prob_w) - pre_t
            if need_x:
                onehot_x = w_t[0][t_b] if len(w_b) == 1 else w_t.gather(1, t_b[..., None].expand(-1, -1, r))
                jac_x[ch, c] = (prob_w - onehot_x) if scale_b is None else prob_w.sub_(onehot_x).mul_(scale_b)
            if need_w:
                x_s = (x_b if scale_b is None else x_b * scale_b).transpose(1, 2)  # [kb, r, cb]
                grad_w[ch] += torch.bmm(x_s, prob)  # out of place: may be bf16
                grad_w[ch].scatter_add_(2, t_b[:, None].expand(-1, r, -1), -x_s.to(grad_w.dtype))
            if need_scale and base is not None:  # + sum_v P_v base_c_v: a row dot, two reads of the block, in
                # fp32 even under autocast; a base_c shared by several chains is multiplied into the spent P instead
                with torch.autocast(prob.device.type, enabled=False):
                    jac_scale[ch, c] += (torch.einsum("kcv,kcv->kc", prob, base_c.to(prob.dtype)) if len(base_c) == kb
                                         else prob.mul_(base_c).sum(dim=2))
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
    chunk_tokens: rows of logits held at once (over all chains of a block; see ``blocks``). Per-token
    output is differentiable in x and scale; the mean also in w and beta. Losses and weight gradients
    are accumulated in at least fp32.
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
