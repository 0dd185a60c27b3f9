"""The sequential reference plan: one chain at a time, an honest full forward per step.

Each (component, chain) is its own group of one chain (``groups.HonestGroup``): the whole model
runs from the embedding at every step, gradients flow only to the component's coordinates, and
nothing is shared between chains. ``engine.run_unit(..., mode="reference")`` runs this plan; the
batched plan must reproduce its statistics to float tolerance under the same seeds.
"""

from __future__ import annotations

from .components import component
from .groups import HonestGroup
from .model import ModelConfig, Params


def plan_reference(params: Params, cfg: ModelConfig, names: list[str], chains: list[int]):
    """[(group, [(component name, chain)])], one chain per group, in (component, chain) order."""
    return [(HonestGroup(params, cfg, component(cfg, name)), [(name, chain)]) for name in names for chain in chains]
