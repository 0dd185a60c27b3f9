"""On-device float64 accumulation of ``stats.ChainStats`` for a stack of chains, with no host sync.

Buffers are updated in place at every kept draw; ``to_chain_stats`` copies them to the host once at
the end of a run. Memory is fixed by (chains, probe tokens, draws): it does not grow while running.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from susc_core.stats.chain_stats import ChainStats


class Accumulator(NamedTuple):
    """Running sums for K chains (float64 on the run's device)."""

    sum_g: torch.Tensor  # [K]
    sum_g2: torch.Tensor  # [K]
    sum_a: torch.Tensor  # [K, T]
    sum_ga: torch.Tensor  # [K, T]
    sum_a2: torch.Tensor  # [K, T]
    g_trace: torch.Tensor  # [K, n_draws]
    diverged_step: torch.Tensor  # [K] int64, -1 while the chain is healthy


def init_accumulator(n_chains: int, n_tokens: int, n_draws: int, device: torch.device | str) -> Accumulator:
    """Zeroed sums for ``n_chains`` chains and ``n_tokens`` probe tokens."""
    z = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
    return Accumulator(z(n_chains), z(n_chains), z(n_chains, n_tokens), z(n_chains, n_tokens), z(n_chains, n_tokens),
                       z(n_chains, n_draws), torch.full((n_chains,), -1, dtype=torch.int64, device=device))


def add_draw(acc: Accumulator, draw: int, g: torch.Tensor, a: torch.Tensor) -> Accumulator:
    """Add draw number ``draw``: g [K] = L_n(draw) - L_n(w*), a [K, T] = A - A* (any float dtype)."""
    g = g.to(torch.float64)
    a = a.to(torch.float64)
    acc.sum_g.add_(g)
    acc.sum_g2.add_(g * g)
    acc.sum_a.add_(a)
    acc.sum_ga.add_(g[:, None] * a)
    acc.sum_a2.add_(a * a)
    acc.g_trace[:, draw] = g
    return acc


def mark_divergence(acc: Accumulator, step: int, bad: torch.Tensor) -> Accumulator:
    """Record ``step`` for chains where ``bad [K]`` is true and which had not diverged before."""
    first = bad & (acc.diverged_step < 0)
    acc.diverged_step.masked_fill_(first, step)
    return acc


def to_chain_stats(acc: Accumulator, loss_star: float, a_star: np.ndarray) -> list[ChainStats]:
    """One ``ChainStats`` per chain (copies to the host)."""
    host = [t.cpu().numpy() for t in acc]
    sum_g, sum_g2, sum_a, sum_ga, sum_a2, trace, div = host
    n_draws = trace.shape[1]
    return [ChainStats(n_draws, 0, float(sum_g[k]), float(sum_g2[k]), sum_a[k], sum_ga[k], sum_a2[k], trace[k],
                       int(div[k]), float(loss_star), np.asarray(a_star, np.float64)) for k in range(len(sum_g))]
