"""The on-disk cache of finished work units: one ``{key}.npz`` per unit, written atomically.

Each file maps ``{component}|{chain}|{field}`` to a numpy array, so it holds the small mergeable
statistics of every (component, chain) the unit ran and nothing else (no pickles).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

UnitStats = dict[tuple[str, int], dict[str, np.ndarray]]
SEP = "|"


class UnitStore:
    """Finished units under ``root``; a unit counts as done once its file exists."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def save(self, key: str, stats: UnitStats) -> None:
        flat = {SEP.join((comp, str(chain), name)): np.asarray(value)
                for (comp, chain), fields in stats.items() for name, value in fields.items()}
        tmp = self.root / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **flat)
        tmp.replace(self.path(key))

    def load(self, key: str) -> UnitStats:
        out: UnitStats = {}
        try:
            with np.load(self.path(key), allow_pickle=False) as data:
                for flat in data.files:
                    comp, chain, name = flat.split(SEP)
                    out.setdefault((comp, int(chain)), {})[name] = data[flat]
        except (OSError, ValueError) as err:
            raise ValueError(f"cached unit {self.path(key)} is unreadable ({err}); delete it and rerun "
                             f"the study to recompute that unit") from err
        return out
