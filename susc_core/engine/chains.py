"""The SGLD + observables loop for one stack of chains, shared by the batched engine and the reference.

A *group* computes per-token losses for a stack of chains of components; it has two methods:
``prepare(tokens [G, B, S+1]) -> cache`` (everything that depends only on w* and the tokens,
computed once and shared by the chains that read those tokens; G minibatch streams, ``seeds.ChainStreams``)
and ``losses(w [k, dim], rows: Rows, cache, mean=False) -> [k, B, S]`` (nats; ``rows`` names the chains of
this pass and the token row each reads; ``mean=True`` returns each chain's mean loss [k], the SGLD step's
objective). ``sample_chains`` runs the loop with no host synchronisation: minibatch indices live on the
device, divergence and statistics are accumulated there; each step is ``sgld.step``, the kernel the
analytic oracles test.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterable, NamedTuple, Protocol

import torch

from susc_core.stats.accumulator import Accumulator, add_draw, init_accumulator, mark_divergence, to_chain_stats
from susc_core.stats.chain_stats import ChainStats
from susc_core.stats.diagnostics import enforce_divergence_policy
from susc_core.engine import sgld
from susc_core.engine.inputs import UnitContexts
from susc_core.engine.seeds import ChainStreams, chain_streams
from susc_core.engine.sgld import SamplerConfig


OnProgress = Callable[[int, int], None]  # (chain·draws done, chain·draws in all): a unit's progress, see sample_plan


class Rows(NamedTuple):
    """The chains of one pass: ``chains`` (a slice of the stack) and ``tokens`` int64 [k] (the row of the
    prepared tokens each reads; ignored when the cache holds one row, shared by all)."""

    chains: slice
    tokens: torch.Tensor


def chain_rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """The pass's rows of a prepared tensor [G, ...]: the shared row (G = 1) whole, else one row per chain."""
    return t[:1] if len(t) == 1 else t[rows.tokens]


class Group(Protocol):
    def prepare(self, tokens: torch.Tensor): ...

    def losses(self, w: torch.Tensor, rows: Rows, cache, mean: bool = False) -> torch.Tensor: ...


class Reference(NamedTuple):
    """Values at w*: loss_star = L_n(w*) (0-d tensor), a_star [T] = l_t(w*) - L_n(w*) over probe tokens."""

    loss_star: torch.Tensor
    a_star: torch.Tensor


def context_chunks(n_contexts: int, seq_len: int, chunk_tokens: int) -> list[slice]:
    """Slices of at most ``max(1, chunk_tokens // seq_len)`` contexts covering ``n_contexts``."""
    size = max(1, chunk_tokens // seq_len)
    return [slice(i, min(i + size, n_contexts)) for i in range(0, n_contexts, size)]


@torch.no_grad()
def reference_values(per_token_loss: Callable[[torch.Tensor], torch.Tensor], contexts: UnitContexts,
                     chunk_tokens: int) -> Reference:
    """L_n(w*) on the observable contexts and A*_t on every probe token (``UnitContexts``: T = P * S, row-major).

    per_token_loss: contexts [n, S+1] -> [n, S] nats at w*, fed at most ``chunk_tokens`` tokens at a time.
    """
    def all_losses(tokens):
        chunks = context_chunks(len(tokens), tokens.shape[1] - 1, chunk_tokens)
        return torch.cat([per_token_loss(tokens[c]) for c in chunks])
    loss_star = all_losses(contexts.obs).mean()
    return Reference(loss_star, all_losses(contexts.probe).reshape(-1) - loss_star)


def pass_rows(token_rows: torch.Tensor, chains_per_pass: int) -> list[Rows]:
    """The passes over K = len(token_rows) chains, at most ``chains_per_pass`` each."""
    return [Rows(slice(i, i + chains_per_pass), token_rows[i:i + chains_per_pass])
            for i in range(0, len(token_rows), chains_per_pass)]


@torch.no_grad()
def _fixed_caches(group: Group, tokens: torch.Tensor, chunk_tokens: int) -> list:
    """``group.prepare`` of each context chunk of the fixed contexts tokens [n, S+1], computed once per run."""
    return [group.prepare(tokens[c].unsqueeze(0)) for c in context_chunks(len(tokens), tokens.shape[1] - 1, chunk_tokens)]


@torch.no_grad()
def _observe(group: Group, w: torch.Tensor, caches: list, passes: list[Rows]) -> torch.Tensor:
    """Per-token losses [K, n, S] of every chain on fixed contexts (their ``_fixed_caches``), float32."""
    return torch.cat([torch.cat([group.losses(w[r.chains], r, cache).float() for r in passes]) for cache in caches],
                     dim=1)


def _loss_and_grad(group: Group, passes: list[Rows], autocast, w: torch.Tensor,
                   cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``grad_fn`` of ``sgld.step``: each chain's mean minibatch loss [K] (nats, fp32) and its gradient
    [K, dim] at w [K, dim], pass by pass."""
    grads, losses = [], []
    for rows in passes:
        leaf = w[rows.chains].detach().requires_grad_(True)
        with autocast():
            loss = group.losses(leaf, rows, cache, mean=True).float()
        grads.append(torch.autograd.grad(loss.sum(), leaf)[0])
        losses.append(loss.detach())
    return torch.cat(losses), torch.cat(grads)


def sample_chains(group: Group, w_star: torch.Tensor, streams: ChainStreams, contexts: UnitContexts,
                  ref: Reference, sampler: SamplerConfig, chunk_tokens: int,
                  on_draw: Callable[[int], None] | None = None) -> Accumulator:
    """Run K = len(streams.noise) chains from w_star ([dim], or [K, dim]: one start per chain); returns their
    on-device statistics.

    streams: the chains' noise generators and minibatch schedule (indices into ``contexts.train``); the
    observables are read on ``contexts.obs`` and ``contexts.probe``. on_draw: called with the number of draws
    taken so far after each draw (progress only; it reads nothing from the device).
    """
    train = contexts.train
    n_chains, device = len(streams.noise), w_star.device
    acc = init_accumulator(n_chains, ref.a_star.numel(), sampler.n_draws, device)
    passes = pass_rows(streams.token_rows, sampler.chains_per_pass)
    low_precision = sampler.forward_dtype != "float32"
    autocast = (lambda: torch.autocast(device.type, dtype=getattr(torch, sampler.forward_dtype))) \
        if low_precision else contextlib.nullcontext
    obs_caches, probe_caches = (_fixed_caches(group, t, chunk_tokens) for t in (contexts.obs, contexts.probe))
    grad_fn = partial(_loss_and_grad, group, passes, autocast)
    state, draw = sgld.init(w_star, n_chains), 0
    for step in range(1, sampler.n_steps + 1):
        tokens = train[streams.schedule[step - 1]].view(-1, sampler.batch_size, train.shape[1])
        with torch.no_grad(), autocast():
            cache = group.prepare(tokens)
        state, info = sgld.step(streams.noise, state, cache, grad_fn, w_star, sampler.step_size, sampler.nbeta,
                                sampler.gamma)
        mark_divergence(acc, step, ~torch.isfinite(info.loss) | (info.loss > ref.loss_star + sampler.blowup_nats))
        if sampler.is_draw(step):
            obs_losses = _observe(group, state.w, obs_caches, passes)
            loss_n = obs_losses.mean(dim=(1, 2))  # [K]
            g = loss_n - ref.loss_star
            a = _observe(group, state.w, probe_caches, passes).flatten(1) - loss_n[:, None] - ref.a_star
            bad = ~torch.isfinite(g) | (g > sampler.blowup_nats) | ~torch.isfinite(a).all(dim=1)
            mark_divergence(acc, step, bad)
            add_draw(acc, draw, g, a)
            draw += 1
            if on_draw is not None:
                on_draw(draw)
    return acc


class PlannedGroup(NamedTuple):
    """One stack of a work unit's plan: its group, members [(component name, chain)], start w_star ([dim] or
    [K, dim]) and sampler (a plan may size ``chains_per_pass`` per group)."""

    group: Group
    members: list[tuple[str, int]]
    w_star: torch.Tensor
    sampler: SamplerConfig


def sample_plan(plan: Iterable[PlannedGroup], contexts: UnitContexts, ref: Reference, seed: int, chunk_tokens: int,
                policy: str, on_progress: OnProgress | None = None) -> dict[tuple[str, int], ChainStats]:
    """The work-unit loop every model shares: each planned stack with its streams (``seeds.chain_streams``)
    through ``sample_chains``; returns {(component, chain): ChainStats} after the divergence ``policy``.
    on_progress: called after every draw with (chain·draws done, chain·draws of the whole plan)."""
    plan = list(plan)
    loss_star, a_star = float(ref.loss_star), ref.a_star.cpu().numpy()
    total = sum(len(members) * sampler.n_draws for _, members, _, sampler in plan)
    results: dict[tuple[str, int], ChainStats] = {}
    done = 0
    for group, members, w_star, sampler in plan:
        streams = chain_streams(seed, members, sampler.share_minibatches, len(contexts.train), sampler.n_steps,
                                sampler.batch_size, w_star.device)
        on_draw = None if on_progress is None else partial(_report, on_progress, done, len(members), total)
        acc = sample_chains(group, w_star, streams, contexts, ref, sampler, chunk_tokens, on_draw)
        results.update(zip(members, to_chain_stats(acc, loss_star, a_star)))
        done += len(members) * sampler.n_draws
    enforce_divergence_policy(results, policy)
    return results


def _report(on_progress: OnProgress, before: int, chains: int, total: int, draws: int) -> None:
    """``on_progress`` of a plan's stack: ``before`` chain·draws of earlier stacks plus ``draws`` of its ``chains``."""
    on_progress(before + chains * draws, total)
