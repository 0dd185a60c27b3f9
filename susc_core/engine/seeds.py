"""Deterministic random streams, derived with numpy SeedSequence so no two chains or runs share one.

A stream is named by (root seed, kind, component name, chain index); the component enters through a
stable hash of its name (never its position in a list), so a chain draws the same numbers whether it
runs alone, in a group, or in the sequential reference path. Kinds: ``noise`` (SGLD Gaussian noise,
one stream per component and chain), ``minibatch`` (minibatch order: one stream per chain index, shared
by that chain index of every component, or one stream for all chains with ``share_minibatches``),
``observables`` (choice of the fixed observable contexts), ``preflight`` (the start vector of the
curvature pre-flight's power iteration), ``study`` (study-level choices named by a label: the head-role
probe sequences, the token rows of the ``tokens`` family).
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import numpy as np
import torch

STREAM_KINDS = ("noise", "minibatch", "observables", "preflight", "study")
SHARED = ""  # component name of streams shared by every chain of every component (e.g. shared minibatches)


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def stream_seed(seed: int, kind: str, component: str = SHARED, chain: int = -1) -> np.random.SeedSequence:
    """The SeedSequence of one stream; ``chain=-1`` and ``component=SHARED`` mean "shared"."""
    if kind not in STREAM_KINDS:
        raise ValueError(f"unknown stream kind {kind!r}; expected one of {STREAM_KINDS}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return np.random.SeedSequence(seed, spawn_key=(stable_hash(kind), stable_hash(component), chain + 1))


def torch_generator(seq: np.random.SeedSequence, device: torch.device | str) -> torch.Generator:
    """A torch Generator on ``device`` seeded from ``seq`` (63 bits of its state)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seq.generate_state(1, np.uint64)[0] >> np.uint64(1)))
    return gen


def study_generator(seed: int, label: str) -> np.random.Generator:
    """The numpy Generator of one study-level choice named ``label`` (stream (seed, "study", label))."""
    return np.random.default_rng(stream_seed(seed, "study", label))


def minibatch_schedule(seq: np.random.SeedSequence, n_contexts: int, n_steps: int, batch_size: int) -> np.ndarray:
    """Context indices of every step's minibatch, int64 [n_steps, batch_size].

    Each step draws ``batch_size`` distinct contexts uniformly from ``n_contexts``.
    """
    if batch_size > n_contexts:
        raise ValueError(f"batch_size={batch_size} exceeds the {n_contexts} training contexts; lower batch_size")
    rng = np.random.default_rng(seq)
    return np.stack([rng.choice(n_contexts, size=batch_size, replace=False) for _ in range(n_steps)]).astype(np.int64)


def choose_contexts(seed: int, n_available: int, n: int, label: str = SHARED) -> np.ndarray:
    """Indices (sorted, distinct) of ``n`` fixed observable contexts out of ``n_available``, int64 [n].

    ``label`` names the set (e.g. a probe domain) so different sets get independent choices.
    """
    if n > n_available:
        raise ValueError(f"asked for {n} observable contexts but only {n_available} exist")
    rng = np.random.default_rng(stream_seed(seed, "observables", label))
    return np.sort(rng.choice(n_available, size=n, replace=False)).astype(np.int64)


class ChainStreams(NamedTuple):
    """The random streams of a stack of K chains: ``noise`` (one generator per chain), ``schedule`` int64
    [n_steps, G * batch_size] (G minibatch streams side by side) and ``token_rows`` int64 [K] (the stream,
    0 .. G-1, each chain draws its minibatches from)."""

    noise: list[torch.Generator]
    schedule: torch.Tensor
    token_rows: torch.Tensor


def chain_streams(seed: int, members: list[tuple[str, int]], share_minibatches: bool, n_contexts: int,
                  n_steps: int, batch_size: int, device: torch.device | str) -> ChainStreams:
    """The streams of a stack of chains ``members`` [(component name, chain)]: a noise generator per member,
    and the minibatch streams: one per distinct chain index (component-independent, sorted by chain index),
    or one shared by every member when ``share_minibatches``."""
    generators = [torch_generator(stream_seed(seed, "noise", name, chain), device) for name, chain in members]
    chain_keys = [-1] if share_minibatches else sorted({chain for _, chain in members})
    schedule = np.concatenate([minibatch_schedule(stream_seed(seed, "minibatch", SHARED, key), n_contexts, n_steps,
                                                  batch_size) for key in chain_keys], axis=1)
    rows = [0 if share_minibatches else chain_keys.index(chain) for _, chain in members]
    return ChainStreams(generators, torch.from_numpy(schedule).to(device), torch.tensor(rows, device=device))
