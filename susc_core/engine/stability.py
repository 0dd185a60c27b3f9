"""Pre-flight stability of SGLD from the curvature at w* (SCIENCE.md §3).

Near w* the SGLD drift of a component is linear, w' = w - ε/2 (nβ H + γ I)(w - w*) + √ε ξ, with H the
Hessian of the minibatch loss restricted to the component. Along the top eigenvector (eigenvalue λ of
nβ·H) the iteration contracts only when ε (λ + γ) < 4 and inflates the variance by 1 / (1 - ε(λ + γ)/4),
so ε (λ + γ) is the number to check before any chain runs. λ comes from power iteration on Hessian-vector
products formed as central differences of the production gradient (the same ``Group.losses`` the chains
step with, whose fused vocabulary kernel has no second derivative).
"""

from __future__ import annotations

from typing import Iterable

import torch

from susc_core.engine.chains import Group, pass_rows
from susc_core.engine.seeds import choose_contexts, stream_seed, torch_generator


def preflight_batch(train: torch.Tensor, n_contexts: int, seed: int) -> tuple[torch.Tensor, torch.Generator]:
    """The pre-flight's minibatch [1, n_contexts, S+1] of train [N, S+1] (chosen by the seed, label
    "preflight") and the generator of its power iteration's start vectors, on train's device."""
    rows = torch.from_numpy(choose_contexts(seed, len(train), min(n_contexts, len(train)), "preflight"))
    return train[rows.to(train.device)][None], torch_generator(stream_seed(seed, "preflight"), train.device)


def top_curvature(group: Group, w_star: torch.Tensor, tokens: torch.Tensor, n_iter: int, fd_step: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Top eigenvalue (largest magnitude, via its Rayleigh quotient) of the Hessian of the mean minibatch loss
    in each row's coordinates, [k] (nats per unit² of weight).

    w_star: [k, dim], one row per component of the group (each as one chain); tokens [1, B, S+1]: the
    minibatch; n_iter power iterations, each two gradient passes at w* ± fd_step·v (|v| = 1).
    """
    k = len(w_star)
    rows = pass_rows(torch.zeros(k, dtype=torch.long, device=w_star.device), k)[0]
    with torch.no_grad():
        cache = group.prepare(tokens)

    def grad(w: torch.Tensor) -> torch.Tensor:
        leaf = w.detach().requires_grad_(True)
        return torch.autograd.grad(group.losses(leaf, rows, cache, mean=True).float().sum(), leaf)[0]

    v = torch.randn(w_star.shape, generator=generator, device=w_star.device)
    v = v / v.norm(dim=1, keepdim=True)
    value = torch.zeros(k, device=w_star.device)
    for _ in range(n_iter):
        hv = (grad(w_star + fd_step * v) - grad(w_star - fd_step * v)) / (2 * fd_step)
        value = (v * hv).sum(dim=1)
        v = hv / hv.norm(dim=1, keepdim=True).clamp_min(torch.finfo(hv.dtype).tiny)
    return value


def preflight(stacks: Iterable[tuple[Group, list[str], torch.Tensor]], train: torch.Tensor, n_contexts: int,
              n_iter: int, fd_step: float, seed: int) -> dict[str, float]:
    """{component: top Hessian eigenvalue at w*} (``top_curvature``) for every stack (group, its component
    names, their starts w* [k, dim]) on the pre-flight's minibatch of ``n_contexts`` contexts of train
    [N, S+1] (``preflight_batch``); one generator of start vectors across the stacks, in order."""
    tokens, generator = preflight_batch(train, n_contexts, seed)
    out = {}
    for group, names, w_star in stacks:
        out.update(zip(names, top_curvature(group, w_star, tokens, n_iter, fd_step, generator).tolist()))
    return out


def stability_number(curvature: float, nbeta: float, gamma: float, step_size: float) -> float:
    """ε (nβ λ + γ): below 4 the linearised SGLD contracts; its variance inflation is 1 / (1 - x/4)."""
    return step_size * (nbeta * abs(curvature) + gamma)
