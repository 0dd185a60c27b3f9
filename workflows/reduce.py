"""Reduce finished units into per-(component, chain) statistics, in a fixed order.

Chains are kept apart (diagnostics need them); probe shards of one chain are concatenated in shard
order. The order of completion never matters: everything is keyed and sorted.
"""

from __future__ import annotations

import numpy as np

from susc_core.stats.chain_stats import ChainStats, concat_tokens
from workflows.plan import WorkUnit
from workflows.unit_store import UnitStats


def to_fields(stats: dict[tuple[str, int], ChainStats]) -> UnitStats:
    """ChainStats -> plain numpy arrays, the form the unit store keeps."""
    return {key: {name: np.asarray(value) for name, value in s._asdict().items()} for key, s in stats.items()}


def from_fields(fields: dict[str, np.ndarray]) -> ChainStats:
    """Inverse of :func:`to_fields` for one chain."""
    values = {name: (fields[name].item() if fields[name].ndim == 0 else fields[name]) for name in ChainStats._fields}
    return ChainStats(**values)


def collect(units: list[WorkUnit], loaded: dict[str, UnitStats]) -> dict[str, list[ChainStats]]:
    """component -> its chains' statistics (chain order), shards concatenated in shard order."""
    shards: dict[tuple[str, int], dict[int, ChainStats]] = {}
    for unit in units:
        for key, fields in loaded[unit.key].items():
            shards.setdefault(key, {})[unit.shard] = from_fields(fields)
    out: dict[str, list[ChainStats]] = {}
    for (comp, chain) in sorted(shards, key=lambda k: (k[0], k[1])):
        parts = [shards[(comp, chain)][s] for s in sorted(shards[(comp, chain)])]
        merged = parts[0]
        for part in parts[1:]:
            merged = concat_tokens(merged, part)
        out.setdefault(comp, []).append(merged)
    return out
