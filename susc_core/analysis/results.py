"""Load a study's run directory as pyarrow tables (and pandas frames on request).

Files a study writes (``workflows.study``):
- ``token_susceptibilities.parquet``: one row per probe token: ``probe``, ``context_id``,
  ``position`` (position t predicts token t+1; the row's token is the predicted y), ``token_id``,
  ``token_text``, then one float64 column of raw χ̂_xy per component (``L0H0`` ...). Schema
  metadata: ``components`` (JSON list, column order), ``layers`` (JSON dict component -> layer).
- ``response_matrix.parquet``: one row per (probe, component): ``probe``, ``component``,
  ``layer``, ``chi``, ``chi_se``, ``chi_std``, ``chi_mixture``, ``n_tokens``.
- ``diagnostics.parquet``: one row per (component, chain): ``component``, ``chain``, ``rhat``,
  ``ess``, ``diverged``, ``diverged_step``, ``llc``, ``mean_g``.
- optional ``head_roles.parquet`` (``component``, ``layer``, ``head``, ``induction``,
  ``previous_token``, ``current_token``; studies add ``ablation_natural``, ``ablation_repeat``, ``role``),
  ``ablation.parquet`` (the token keys, then one zero-ablation loss delta in nats per head) and
  ``chain_sums.parquet`` (per (component, chain): ``count``, ``sum_g``, ``diverged``, and the lists
  ``sum_ga``, ``sum_a`` over tokens in the token table's order; studies since issue 17 add the list
  ``g_trace``: g = L_n(draw) − L_n(w*) per draw, nats).
- ``manifest.json``: the resolved config under ``config`` (``config.perturbation.delta_h``),
  timings, hashes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOKEN_KEYS = ("probe", "context_id", "position")
FILES = {
    "tokens": "token_susceptibilities.parquet",
    "response": "response_matrix.parquet",
    "diagnostics": "diagnostics.parquet",
    "head_roles": "head_roles.parquet",
    "ablation": "ablation.parquet",
    "chain_sums": "chain_sums.parquet",
}
OPTIONAL = ("head_roles", "ablation", "chain_sums")
MANIFEST = "manifest.json"
REQUIRED_COLUMNS = {
    "tokens": (*TOKEN_KEYS, "token_id", "token_text"),
    "response": ("probe", "component", "layer", "chi", "chi_se", "chi_std", "n_tokens"),
    "diagnostics": ("component", "chain", "rhat", "ess", "diverged", "diverged_step", "llc",
                    "mean_g"),
    "head_roles": ("component", "layer", "head", "induction", "previous_token", "current_token"),
    "ablation": TOKEN_KEYS,
    "chain_sums": ("component", "chain", "count", "sum_g", "diverged", "sum_ga", "sum_a"),
}


class Trace(NamedTuple):
    """The g trace of one (component, chain): g = L_n(draw) − L_n(w*) per draw (nats)."""

    chain: int
    diverged: bool  # diverged, or excluded by a sampler diagnostic: left out of every estimate
    g: np.ndarray  # [count]


@dataclass(frozen=True)
class RunResults:
    """A run directory's tables; ``head_roles`` / ``ablation`` are None when the run has none."""

    run_dir: Path
    tokens: pa.Table
    response: pa.Table
    diagnostics: pa.Table
    head_roles: pa.Table | None
    ablation: pa.Table | None
    chain_sums: pa.Table | None  # per (component, chain) sums for resampling chains (studies write it)
    manifest: dict
    components: tuple[str, ...]  # component columns of ``tokens``, in order
    layers: dict[str, int]  # component -> layer index

    def table(self, name: str) -> pa.Table | None:
        """The table called ``name`` (one of ``FILES``)."""
        if name not in FILES:
            raise KeyError(f"unknown table {name!r}; valid: {sorted(FILES)}")
        return getattr(self, name)

    def to_pandas(self, name: str):
        """The table called ``name`` as a pandas DataFrame (None for an absent optional table)."""
        table = self.table(name)
        return None if table is None else table.to_pandas()

    def chi_matrix(self) -> np.ndarray:
        """Raw per-token susceptibilities [n_tokens, n_components] (rows in table order)."""
        return np.column_stack([self.tokens.column(c).to_numpy() for c in self.components])

    def roles(self) -> dict[str, str]:
        """component -> the head's measured role (``head_roles.parquet``'s ``role``: induction,
        previous-token, multigram, ...); {} when the run has no such column (adapter models)."""
        if self.head_roles is None or "role" not in self.head_roles.column_names:
            return {}
        return {c: str(r) for c, r in zip(self.head_roles.column("component").to_pylist(),
                                          self.head_roles.column("role").to_pylist()) if r is not None}

    def g_traces(self) -> dict[str, list[Trace]] | None:
        """component -> its chains' g traces in chain order; None when the run recorded none (no
        chain_sums.parquet, or one written before it had a ``g_trace`` column)."""
        if self.chain_sums is None or "g_trace" not in self.chain_sums.column_names:
            return None
        out: dict[str, list[Trace]] = {}
        columns = (self.chain_sums.column(k).to_pylist() for k in ("component", "chain", "diverged", "g_trace"))
        for comp, chain, diverged, g in sorted(zip(*columns), key=lambda r: (r[0], r[1])):
            out.setdefault(comp, []).append(Trace(int(chain), bool(diverged), np.asarray(g, np.float64)))
        return out

    @property
    def delta_h(self) -> float | None:
        """The δh of the dataset-level mixture estimate, from the manifest (None if absent)."""
        value = self.manifest.get("config", {}).get("perturbation", {}).get("delta_h")
        return None if value is None else float(value)


def _read(run_dir: Path, name: str) -> pa.Table | None:
    path = run_dir / FILES[name]
    if not path.exists():
        if name in OPTIONAL:
            return None
        raise FileNotFoundError(f"{path} is missing: is {run_dir} a finished study run directory "
                                "(written by `python -m workflows.study`)?")
    table = pq.read_table(path)
    missing = [c for c in REQUIRED_COLUMNS[name] if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; it has {table.column_names}")
    return table


def load_run(run_dir: str | Path) -> RunResults:
    """Read every table of a run directory (see the module docstring for the files)."""
    run_dir = Path(run_dir)
    tables = {name: _read(run_dir, name) for name in FILES}
    meta = tables["tokens"].schema.metadata or {}
    if b"components" not in meta or b"layers" not in meta:
        raise ValueError(f"{run_dir / FILES['tokens']} lacks the schema metadata keys "
                         "'components' and 'layers' (JSON) naming its component columns")
    components = tuple(json.loads(meta[b"components"]))
    layers = {str(k): int(v) for k, v in json.loads(meta[b"layers"]).items()}
    absent = [c for c in components if c not in tables["tokens"].column_names or c not in layers]
    if absent:
        raise ValueError(f"components {absent} are listed in the metadata but lack a column or "
                         f"a layer in {run_dir / FILES['tokens']}")
    manifest_path = run_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    return RunResults(run_dir, tables["tokens"], tables["response"], tables["diagnostics"],
                      tables["head_roles"], tables["ablation"], tables["chain_sums"], manifest, components,
                      layers)
