"""Work units: run SGLD chains of named components and return their streaming statistics.

``run_unit`` is the API the orchestration calls (plain Python, no Ray). Every chain's randomness is
derived from (seed, stream kind, component name, chain index) (``seeds``), so chain k of component C
gives the same statistics alone, in any group, or in the sequential reference plan (to float
tolerance): the orchestrator may split (components x chains) any way it likes.

Batched plan: the heads of one layer form one ``HeadGroup`` (all their chains on one chain axis);
every other component is a ``CachedGroup`` of its chains. Upstream activations are computed once per
minibatch stream and shared by the chains that read it: chain k of every component reads stream k
(``seeds.chain_streams``), or every chain the one stream with ``share_minibatches``.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from susc_core.engine.chains import OnProgress, PlannedGroup, reference_values, sample_plan
from susc_core.engine.inputs import UnitContexts, check_contexts, master_weights
from susc_core.model.components import component, gather, is_head, resolve_components
from susc_core.engine.reference import plan_reference
from susc_core.engine.groups import CachedGroup, HeadGroup
from susc_core.model.transformer import LOSS_CHUNK_TOKENS, ModelConfig, Params, param_shapes, per_token_loss
from susc_core.engine.stability import preflight
from susc_core.engine.sgld import SamplerConfig
from susc_core.stats.chain_stats import ChainStats

MODES = ("batched", "reference")
# bump when a change alters the statistics a unit returns (beyond float tolerance): studies key their
# cached units on it, so units computed by older code are never mixed with new ones
NUMERICS_VERSION = 3


def plan_batched(params: Params, cfg: ModelConfig, names: list[str], chains: list[int], chunk_tokens: int):
    """[(group, [(component name, chain)])]: one HeadGroup per layer with selected heads, one CachedGroup
    per other component; members in (component, chain) order. Last-block heads use the low-rank logit
    change (see ``HeadGroup``); on an accelerator a CachedGroup's chains share one vmapped forward.
    chunk_tokens: token rows of vocabulary logits per block (speed and memory only)."""
    heads_by_layer: dict[int, list[str]] = defaultdict(list)
    on_accelerator = params["embed.W_E"].device.type != "cpu"
    plan = []
    for name in names:
        if is_head(name):
            heads_by_layer[component(cfg, name).layer].append(name)
        else:
            plan.append((CachedGroup(params, cfg, component(cfg, name), chunk_tokens, vmap_chains=on_accelerator),
                         [(name, c) for c in chains]))
    for layer, heads in sorted(heads_by_layer.items()):
        members = [(name, c) for name in heads for c in chains]
        comps = [component(cfg, name) for name, _ in members]
        plan.insert(0, (HeadGroup(params, cfg, layer, comps[0], [comp.head for comp in comps], chunk_tokens),
                        members))
    return plan


def run_unit(model_cfg: ModelConfig, w_star: Params, components: list[str], chains: list[int],
             sampler: SamplerConfig, contexts: UnitContexts, seed: int, device: torch.device | str = "cpu",
             mode: str = "batched", chunk_tokens: int = LOSS_CHUNK_TOKENS,
             on_progress: OnProgress | None = None) -> dict[tuple[str, int], ChainStats]:
    """SGLD chains ``chains`` of each component in ``components`` (names or globs; "full" = unrestricted).

    w_star: the checkpoint's parameters (any device; used as fp32 master weights on ``device``).
    contexts: the unit's training pool, observable and probe contexts (``UnitContexts``).
    Returns {(component, chain): ChainStats} with n_draws draws each. Diverged chains raise
    (policy "fail") or are returned flagged with a warning (policy "drop"). mode: "batched" or
    "reference" (the sequential plan, for tests and benchmarks). chunk_tokens: token rows of vocabulary
    logits held at once (speed and memory; a study passes ``model.loss_chunk_tokens``). on_progress: called
    after every draw with (chain·draws done, chain·draws of the unit) (``chains.sample_plan``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if missing := set(param_shapes(model_cfg)) ^ set(w_star):
        raise ValueError(f"w_star does not match model_cfg; differing parameter names: {sorted(missing)}")
    if not chains or len(set(chains)) != len(chains) or min(chains) < 0:
        raise ValueError(f"chains must be distinct non-negative indices, got {chains}")
    names = resolve_components(model_cfg, components)
    device = torch.device(device)
    params = master_weights(w_star, device)
    contexts = contexts.to(device)
    contexts.check(model_cfg)
    ref = reference_values(lambda tokens: per_token_loss(params, model_cfg, tokens, chunk_tokens=chunk_tokens),
                           contexts, chunk_tokens)
    plan = (plan_batched if mode == "batched" else plan_reference)(params, model_cfg, names, list(chains), chunk_tokens)
    starts = (torch.stack([gather(params, component(model_cfg, name)) for name, _ in members]) for _, members in plan)
    return sample_plan((PlannedGroup(group, members, w0, sampler) for (group, members), w0 in zip(plan, starts)),
                       contexts, ref, seed, chunk_tokens, sampler.divergence_policy, on_progress)


def preflight_curvature(model_cfg: ModelConfig, w_star: Params, components: list[str], train_contexts: torch.Tensor,
                        n_contexts: int, n_iter: int, fd_step: float, seed: int,
                        device: torch.device | str = "cpu", chunk_tokens: int = LOSS_CHUNK_TOKENS) -> dict[str, float]:
    """Top Hessian eigenvalue of the mean minibatch loss restricted to each component at w* (``stability``),
    {name: λ} (nats per unit² of weight, before nβ), on ``n_contexts`` training contexts (``preflight_batch``);
    the batched plan's groups form the gradients (one chain per component)."""
    names = resolve_components(model_cfg, components)
    device = torch.device(device)
    params = master_weights(w_star, device)
    train = train_contexts.to(device, torch.long)
    check_contexts(model_cfg, train_contexts=train)
    stacks = [(group, [name for name, _ in members],
               torch.stack([gather(params, component(model_cfg, name)) for name, _ in members]))
              for group, members in plan_batched(params, model_cfg, names, [0], chunk_tokens)]
    return preflight(stacks, train, n_contexts, n_iter, fd_step, seed)
