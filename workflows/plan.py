"""Planning a study: split (components × chains × probe shards) into work units with stable keys.

A unit's key hashes everything that determines its statistics (the config slice that reaches the
engine, the model and data hashes, the root seed, its components, chains and shard), so a rerun finds
finished units in the cache and an edit of any input invalidates exactly the units it touches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkUnit:
    """One Ray task: some components' chains on one shard of the probe tokens."""

    components: tuple[str, ...]
    chains: tuple[int, ...]
    shard: int  # index of the probe-context shard
    key: str  # content hash; the unit's file name in the cache

    def label(self) -> str:
        comps = self.components[0] if len(self.components) == 1 else f"{self.components[0]}..{self.components[-1]}"
        return f"{comps} chains {list(self.chains)} shard {self.shard}"


def content_hash(obj) -> str:
    """sha256 hex of a JSON-serialisable object with sorted keys (16 hex chars)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _groups(items: list, size: int) -> list[tuple]:
    size = size if size > 0 else len(items)
    return [tuple(items[i:i + size]) for i in range(0, len(items), size)]


def plan_units(components: list[str], n_chains: int, n_shards: int, components_per_unit: int,
               chains_per_unit: int, fingerprint: dict) -> list[WorkUnit]:
    """All work units of a study, in a fixed order (component group, then chains, then shard).

    ``fingerprint`` holds what every unit shares (sampler settings, model/data hashes, seed); a
    unit's key adds its own components, chains and shard. Components keep their given order so that
    groups stay within a layer when the caller lists them layer by layer.
    """
    if n_shards < 1 or n_chains < 1:
        raise ValueError(f"need at least one chain and one shard, got chains={n_chains}, shards={n_shards}")
    base = content_hash(fingerprint)
    units = []
    for comps in _groups(list(components), components_per_unit):
        for chains in _groups(list(range(n_chains)), chains_per_unit):
            for shard in range(n_shards):
                key = content_hash({"base": base, "components": comps, "chains": chains, "shard": shard})
                units.append(WorkUnit(comps, chains, shard, key))
    return units
