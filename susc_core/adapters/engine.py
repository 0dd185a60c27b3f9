"""Restricted-SGLD work units for any ``ModelAdapter``: same statistics, seeds and loop as ``engine.run_unit``.

Each component's chains run as one stack: ``AdapterGroup`` (the ``chains.Group`` protocol) scatters a
chain's coordinates ``w [dim]`` into the fp32 master weights and evaluates the adapter's per-token loss,
with ``torch.func.vmap`` over the stacked coordinates of ONLY the component (the rest of the model is
shared, never copied per chain). The work-unit loop is ``chains.sample_plan``, as for the bundled model;
streams come from ``seeds`` keyed by (component name, chain), so a chain gives the same ``ChainStats``
alone or in a group. ``memory_budget_mib`` sizes the chains per batched pass from a measurement of the bytes one
more chain keeps for the backward pass (``saved_bytes``), on any device.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import torch
from torch.func import vmap

from susc_core.engine.chains import (OnProgress, PlannedGroup, Rows, chain_rows, pass_rows, reference_values,
                                     sample_plan)
from susc_core.engine.inputs import UnitContexts, check_contexts, master_weights
from susc_core.engine.memory import MIB, peak_memory_mib
from susc_core.engine.stability import preflight
from susc_core.engine.sgld import SamplerConfig
from susc_core.stats.chain_stats import ChainStats
from susc_core.model.transformer import Params

from .base import ModelAdapter, expand_names, flat_indices, gather_indexed, scatter_indexed

log = logging.getLogger(__name__)
CHAIN_STATE_BUFFERS = 5  # [dim] float32 buffers per chain in an SGLD step: w, grad, noise, drift, new w


class AdapterGroup:
    """Chains of one component of an adapter. tokens [G, B, S+1] (G minibatch streams, see ``chains.Rows``);
    ``losses(w [k, dim], rows, cache) -> [k, B, S]`` nats."""

    def __init__(self, adapter: ModelAdapter, base: Params, index: dict[str, torch.Tensor]):
        self.adapter, self.base, self.index = adapter, base, index

    def prepare(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens

    def _loss(self, w: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.adapter.per_token_loss(scatter_indexed(self.base, self.index, w), tokens)

    def losses(self, w: torch.Tensor, rows: Rows, cache: torch.Tensor, mean: bool = False) -> torch.Tensor:
        if cache.shape[0] == 1:
            out = vmap(self._loss, in_dims=(0, None))(w, cache[0])
        else:
            out = vmap(self._loss)(w, chain_rows(cache, rows))
        return out.mean(dim=(1, 2)) if mean else out


def saved_bytes(group: AdapterGroup, w: torch.Tensor, tokens: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for the backward of one gradient pass of chains w [k, dim]
    on tokens [1, B, S+1] (the activation memory of a pass)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    leaf = w.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        group.losses(leaf, pass_rows(torch.zeros(len(leaf), dtype=torch.long), len(leaf))[0], tokens).sum()
    return sum(storages.values())


def chains_per_pass_for_budget(group: AdapterGroup, w_star: torch.Tensor, tokens: torch.Tensor,
                               memory_budget_mib: float) -> int:
    """Most chains per gradient pass that fit ``memory_budget_mib``: per-chain bytes = saved bytes of two
    chains minus one, plus the chain's SGLD state (``CHAIN_STATE_BUFFERS`` rows of [dim]); shared bytes
    = one chain's saved bytes minus its activations (mostly the weights autograd keeps). w_star: [dim]."""
    one, two = (saved_bytes(group, w_star.expand(k, -1), tokens) for k in (1, 2))
    activations = max(two - one, 1)
    per_chain = activations + CHAIN_STATE_BUFFERS * w_star.numel() * w_star.element_size()
    shared = max(one - activations, 0)
    fit = int((memory_budget_mib * MIB - shared) // per_chain)
    if fit < 1:
        raise ValueError(f"memory_budget_mib={memory_budget_mib:g} is below the {(shared + per_chain) / MIB:.1f} MiB "
                         f"one chain needs; raise it, or lower sampler.batch_size or the context length")
    return fit


def run_adapter_unit(adapter: ModelAdapter, components: list[str], chains: list[int], sampler: SamplerConfig,
                     contexts: UnitContexts, seed: int, device: torch.device | str = "cpu",
                     memory_budget_mib: float | None = None,
                     on_progress: OnProgress | None = None) -> dict[tuple[str, int], ChainStats]:
    """SGLD chains ``chains`` of each component in ``components`` (names or globs; "full" = unrestricted).

    contexts: the unit's training pool, observable and probe contexts (``UnitContexts``).
    memory_budget_mib: when given, each component's chains per gradient pass are sized to fit it
    (``chains_per_pass_for_budget``), replacing ``sampler.chains_per_pass``. ``sampler.forward_dtype``
    "bfloat16" runs the gradient forward under autocast; master weights and observables stay fp32.
    Returns {(component, chain): ChainStats}; diverged chains raise (policy "fail") or are returned
    flagged with a warning ("drop"). Logs the peak memory (``peak_memory_mib``). on_progress: called after every
    draw with (chain·draws done, chain·draws of the unit).
    """
    if not chains or len(set(chains)) != len(chains) or min(chains) < 0:
        raise ValueError(f"chains must be distinct non-negative indices, got {chains}")
    names = expand_names(adapter.component_names(), components)
    device = torch.device(device)
    params = master_weights(adapter.params(), device)
    contexts = contexts.to(device)
    contexts.check(adapter)
    ref = reference_values(partial(adapter.per_token_loss, params), contexts, adapter.loss_chunk_tokens)
    plan = []
    for name in names:
        index = flat_indices(adapter.component_mask(name), params)
        group = AdapterGroup(adapter, params, index)
        w_star = gather_indexed(params, index)
        run_sampler = sampler
        if memory_budget_mib is not None:
            fit = chains_per_pass_for_budget(group, w_star, contexts.train[: sampler.batch_size].unsqueeze(0),
                                             memory_budget_mib)
            run_sampler = dataclasses.replace(sampler, chains_per_pass=fit)
            log.info("%s: %d chain(s) per pass fit %g MiB", name, fit, memory_budget_mib)
        plan.append(PlannedGroup(group, [(name, c) for c in chains], w_star, run_sampler))
    results = sample_plan(plan, contexts, ref, seed, adapter.loss_chunk_tokens, sampler.divergence_policy,
                          on_progress)
    log.info("peak memory %.1f MiB on %s", peak_memory_mib(device), device)
    return results


def adapter_preflight_curvature(adapter: ModelAdapter, components: list[str], train_contexts: torch.Tensor,
                                n_contexts: int, n_iter: int, fd_step: float, seed: int,
                                device: torch.device | str = "cpu") -> dict[str, float]:
    """``engine.unit.preflight_curvature`` for an adapter: {name: top Hessian eigenvalue of the mean minibatch
    loss restricted to the component at w*}, one ``AdapterGroup`` per component."""
    names = expand_names(adapter.component_names(), components)
    device = torch.device(device)
    params = master_weights(adapter.params(), device)
    train = train_contexts.to(device, torch.long)
    check_contexts(adapter, train_contexts=train)
    stacks = []
    for name in names:
        index = flat_indices(adapter.component_mask(name), params)
        stacks.append((AdapterGroup(adapter, params, index), [name], gather_indexed(params, index)[None]))
    return preflight(stacks, train, n_contexts, n_iter, fd_step, seed)
