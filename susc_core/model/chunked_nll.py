"""Per-token NLL over the vocabulary for any autograd or ``vmap`` caller, chunked so that at most
``chunk_tokens`` rows of logits exist at a time, forward or backward (the backward recomputes each chunk).

The model's own loss (``model.per_token_loss``: training, values at w*, head roles) and every adapter use
it. The engine's groups use ``fused_nll`` instead: a stack of chains whose gradients are formed in the
forward's single pass over the logits (faster, but neither ``vmap``-able nor twice differentiable).
"""

from __future__ import annotations

import torch


class _ChunkedNLL(torch.autograd.Function):
    """-log softmax(x @ w_u.T + b_u)[target] row by row in chunks; the backward recomputes each chunk."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w_u, b_u, targets, chunk_tokens):
        out = []
        for s in range(0, x.shape[0], chunk_tokens):
            logits = (x[s:s + chunk_tokens] @ w_u.T.to(x.dtype)).float() + b_u
            out.append(torch.logsumexp(logits, -1) - logits.gather(-1, targets[s:s + chunk_tokens, None])[:, 0])
        return torch.cat(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_u, b_u, targets, chunk_tokens = inputs
        ctx.save_for_backward(x, w_u, b_u, targets)
        ctx.chunk_tokens = chunk_tokens

    @staticmethod
    def backward(ctx, grad_out):
        x, w_u, b_u, targets = ctx.saved_tensors
        w32 = w_u.float()
        grad_x = []
        grad_w = torch.zeros_like(w32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(b_u) if ctx.needs_input_grad[2] else None
        for s in range(0, x.shape[0], ctx.chunk_tokens):
            xs = x[s:s + ctx.chunk_tokens].float()
            probs = torch.softmax(xs @ w32.T + b_u, -1)
            one_hot = torch.zeros_like(probs).scatter(-1, targets[s:s + ctx.chunk_tokens, None], 1.0)
            g = (probs - one_hot) * grad_out[s:s + ctx.chunk_tokens, None]  # d loss / d logits
            if ctx.needs_input_grad[0]:
                grad_x.append((g @ w32).to(x.dtype))
            if grad_w is not None:
                grad_w = grad_w + g.T @ xs
            if grad_b is not None:
                grad_b = grad_b + g.sum(0)
        return torch.cat(grad_x) if grad_x else None, None if grad_w is None else grad_w.to(w_u.dtype), grad_b, None, None


def chunked_nll(x: torch.Tensor, w_u: torch.Tensor, b_u: torch.Tensor | None, targets: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
    """Per-token negative log-likelihood in nats (float32) of the final hidden states.

    x: [..., d_model] normalised final residual; w_u: [d_vocab, d_model] (``nn.Linear`` layout);
    b_u: [d_vocab] or None; targets: [...] ids. Returns [...]. At most ``chunk_tokens`` rows of logits
    exist at any time, forward or backward (the backward recomputes them), also under ``vmap``.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    b = torch.zeros(w_u.shape[0], device=w_u.device) if b_u is None else b_u.float()
    flat = _ChunkedNLL.apply(x.reshape(-1, x.shape[-1]), w_u, b, targets.reshape(-1), chunk_tokens)
    return flat.reshape(targets.shape)
