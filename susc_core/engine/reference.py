"""The sequential reference plan: one chain at a time, an honest full forward per step.

Each (component, chain) is its own group of one chain (``groups.HonestHeadGroup`` for a head,
``groups.HonestGroup`` otherwise): the whole model runs from the embedding at every step, gradients are
formed only for the component's coordinates, the vocabulary goes through the same fused kernel as the
batched plan, and nothing is shared between chains, steps or draws. ``engine.run_unit(...,
mode="reference")`` runs this plan; the batched plan must reproduce its statistics to float tolerance
under the same seeds.
"""

from __future__ import annotations

from susc_core.model.components import component, is_head
from susc_core.engine.groups import HonestGroup, HonestHeadGroup
from susc_core.model.transformer import ModelConfig, Params


def plan_reference(params: Params, cfg: ModelConfig, names: list[str], chains: list[int], chunk_tokens: int):
    """[(group, [(component name, chain)])], one chain per group, in (component, chain) order; chunk_tokens:
    token rows of vocabulary logits per block."""
    def group(name: str):
        comp = component(cfg, name)
        return (HonestHeadGroup(params, cfg, comp, chunk_tokens) if is_head(name)
                else HonestGroup(params, cfg, comp, chunk_tokens))

    return [(group(name), [(name, chain)]) for name in names for chain in chains]
