"""The SGLD + observables loop for one stack of chains, shared by the batched engine and the reference.

A *group* computes per-token losses for a stack of chains of components; it has two methods:
``prepare(tokens [G, B, S+1]) -> cache`` (everything that depends only on w* and the tokens,
computed once and shared by all chains; G = 1 for shared tokens, or one row per chain) and
``losses(w [k, dim], rows: slice, cache, mean=False) -> [k, B, S]`` (nats; ``rows`` selects the chains
of this pass; ``mean=True`` returns each chain's mean loss [k], the SGLD step's objective).
``sample_chains`` runs the loop with no host synchronisation: minibatch indices live on the device,
divergence and statistics are accumulated there.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Protocol, Sequence

import torch

from susc_core.stats.accumulator import Accumulator, add_draw, init_accumulator, mark_divergence
from susc_core.engine.sgld import SamplerConfig, draw_noise, sgld_update


class Group(Protocol):
    def prepare(self, tokens: torch.Tensor): ...

    def losses(self, w: torch.Tensor, rows: slice, cache, mean: bool = False) -> torch.Tensor: ...


class Reference(NamedTuple):
    """Values at w*: loss_star = L_n(w*) (0-d tensor), a_star [T] = l_t(w*) - L_n(w*) over probe tokens."""

    loss_star: torch.Tensor
    a_star: torch.Tensor


def context_chunks(n_contexts: int, seq_len: int, chunk_tokens: int) -> list[slice]:
    """Slices of at most ``max(1, chunk_tokens // seq_len)`` contexts covering ``n_contexts``."""
    size = max(1, chunk_tokens // seq_len)
    return [slice(i, min(i + size, n_contexts)) for i in range(0, n_contexts, size)]


@torch.no_grad()
def reference_values(per_token_loss: Callable[[torch.Tensor], torch.Tensor], obs: torch.Tensor, probe: torch.Tensor,
                     chunk_tokens: int) -> Reference:
    """L_n(w*) on obs [M, S+1] and A*_t on every token of probe [P, S+1] (T = P * S, row-major).

    per_token_loss: contexts [n, S+1] -> [n, S] nats at w*, fed at most ``chunk_tokens`` tokens at a time.
    """
    def all_losses(tokens):
        chunks = context_chunks(len(tokens), tokens.shape[1] - 1, chunk_tokens)
        return torch.cat([per_token_loss(tokens[c]) for c in chunks])
    loss_star = all_losses(obs).mean()
    return Reference(loss_star, all_losses(probe).reshape(-1) - loss_star)


def _pass_rows(n_chains: int, chains_per_pass: int) -> list[slice]:
    return [slice(i, min(i + chains_per_pass, n_chains)) for i in range(0, n_chains, chains_per_pass)]


@torch.no_grad()
def _fixed_caches(group: Group, tokens: torch.Tensor, chunk_tokens: int) -> list:
    """``group.prepare`` of each context chunk of the fixed contexts tokens [n, S+1], computed once per run."""
    return [group.prepare(tokens[c].unsqueeze(0)) for c in context_chunks(len(tokens), tokens.shape[1] - 1, chunk_tokens)]


@torch.no_grad()
def _observe(group: Group, w: torch.Tensor, caches: list, chains_per_pass: int) -> torch.Tensor:
    """Per-token losses [K, n, S] of every chain on fixed contexts (their ``_fixed_caches``), float32."""
    return torch.cat([torch.cat([group.losses(w[r], r, cache).float() for r in _pass_rows(len(w), chains_per_pass)])
                      for cache in caches], dim=1)


def sample_chains(group: Group, w_star: torch.Tensor, generators: Sequence[torch.Generator],
                  schedule: torch.Tensor, train: torch.Tensor, obs: torch.Tensor, probe: torch.Tensor,
                  ref: Reference, sampler: SamplerConfig, chunk_tokens: int) -> Accumulator:
    """Run K = len(generators) chains from w_star [dim]; returns their on-device statistics.

    schedule: [n_steps, G * batch_size] int64 indices into train [N, S+1] (G = 1 shared, else K);
    obs [M, S+1], probe [P, S+1]: fixed observable and probe contexts.
    """
    n_chains, device = len(generators), w_star.device
    w = w_star.expand(n_chains, -1).clone()
    acc = init_accumulator(n_chains, ref.a_star.numel(), sampler.n_draws, device)
    passes = _pass_rows(n_chains, sampler.chains_per_pass)
    low_precision = sampler.forward_dtype != "float32"
    autocast = (lambda: torch.autocast(device.type, dtype=getattr(torch, sampler.forward_dtype))) \
        if low_precision else contextlib.nullcontext
    obs_caches, probe_caches = (_fixed_caches(group, t, chunk_tokens) for t in (obs, probe))
    draw = 0
    for step in range(1, sampler.n_steps + 1):
        tokens = train[schedule[step - 1]].view(-1, sampler.batch_size, train.shape[1])
        with torch.no_grad(), autocast():
            cache = group.prepare(tokens)
        grads, batch_loss = [], []
        for rows in passes:
            leaf = w[rows].detach().requires_grad_(True)
            with autocast():
                loss = group.losses(leaf, rows, cache, mean=True).float()
            grads.append(torch.autograd.grad(loss.sum(), leaf)[0])
            batch_loss.append(loss.detach())
        batch_loss = torch.cat(batch_loss)
        noise = draw_noise(generators, tuple(w.shape), device)
        w = sgld_update(w, torch.cat(grads), w_star, noise, sampler.step_size, sampler.nbeta, sampler.gamma)
        mark_divergence(acc, step, ~torch.isfinite(batch_loss) | (batch_loss > ref.loss_star + sampler.blowup_nats))
        if sampler.is_draw(step):
            obs_losses = _observe(group, w, obs_caches, sampler.chains_per_pass)
            loss_n = obs_losses.mean(dim=(1, 2))  # [K]
            g = loss_n - ref.loss_star
            a = _observe(group, w, probe_caches, sampler.chains_per_pass).flatten(1) - loss_n[:, None] - ref.a_star
            bad = ~torch.isfinite(g) | (g > sampler.blowup_nats) | ~torch.isfinite(a).all(dim=1)
            mark_divergence(acc, step, bad)
            add_draw(acc, draw, g, a)
            draw += 1
    return acc
