"""Build the study's output tables from reduced statistics (run-directory schema in README.md).

Every table carries schema metadata: the component list and layers, the estimator, the units.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from susc_core.model.components import FULL, component_layer
from susc_core.analysis.standardize import zscore
from susc_core.stats.estimators import convergence, llc, mixture_chi, per_token_chi, probe_means
from susc_core.stats.diagnostics import MIN_DRAWS, ess
from susc_core.stats.chain_stats import ChainStats

ESTIMATORS = {True: "chi_hat_xy", False: "chi_hat_xy restricted: -Cov_C[g, a] (no full run)"}  # by has-full


def _meta(components: list[str], layers: dict[str, int], **extra) -> dict[str, str]:
    return {"components": json.dumps(components), "layers": json.dumps(layers),
            **{k: json.dumps(v) for k, v in extra.items()}}


def layers_of(n_layers: int, components: list[str]) -> dict[str, int]:
    """component -> the first layer it changes (``components.component_layer``: 0 for embed, n_layers
    for ln_final/unembed)."""
    return {name: component_layer(name, n_layers) for name in components}


def reference(stats: dict[str, list[ChainStats]], comp: str) -> list[ChainStats]:
    """The chains whose mean of a_t centres χ̂ of ``comp``: the full run when the study has one, else
    the component's own chains (the restricted covariance, see ``susc_core.stats.estimators``)."""
    return stats.get(FULL, stats[comp])


def context_halves(probe_rows: pa.Table) -> np.ndarray:
    """"a" / "b" for each probe context [P] (object array), alternating over each probe's contexts in
    order: half a feeds the per-token aggregate, half b the dataset-level estimate (disjoint data)."""
    seen: Counter[str] = Counter()
    halves = []
    for p in probe_rows.column("probe").to_pylist():
        halves.append("a" if seen[p] % 2 == 0 else "b")
        seen[p] += 1
    return np.asarray(halves, dtype=object)


def token_keys(probe_rows: pa.Table, probe_tokens: np.ndarray, texts: list[list[str]]) -> dict[str, np.ndarray | list]:
    """Key columns of the per-token tables; position t predicts token t+1 of its context.

    probe_tokens: [P, L+1] ids. Returns column -> values of length T = P·L (row-major). ``half``
    alternates a/b over each probe's contexts: the δh-mixture estimate uses half b only, so that
    validation can compare it with the per-token aggregate over the disjoint half a.
    """
    n_ctx, width = probe_tokens.shape
    positions = np.tile(np.arange(width - 1, dtype=np.int32), n_ctx)
    rows = np.repeat(np.arange(n_ctx), width - 1)
    return {
        "probe": np.asarray(probe_rows.column("probe").to_pylist(), dtype=object)[rows],
        "half": context_halves(probe_rows)[rows],
        "domain": np.asarray(probe_rows.column("domain").to_pylist(), dtype=object)[rows],
        "context_id": probe_rows.column("context_id").to_numpy()[rows],
        "position": positions,
        "token_id": probe_tokens[:, 1:].reshape(-1).astype(np.int32),
        "token_text": [t for ctx in texts for t in ctx[1:]],
    }


def per_token_table(keys: dict, values: dict[str, np.ndarray]) -> pa.Table:
    """Key columns (numpy object arrays become strings) + one float64 column per entry of ``values``."""
    columns = {k: pa.array(list(v) if isinstance(v, np.ndarray) and v.dtype == object else v) for k, v in keys.items()}
    return pa.table(columns | {name: pa.array(v, pa.float64()) for name, v in values.items()})


def token_table(keys: dict, chi: dict[str, np.ndarray], components: list[str], layers: dict[str, int],
                estimator: str = ESTIMATORS[True]) -> pa.Table:
    """token_susceptibilities: key columns + one raw χ̂ column per component."""
    return per_token_table(keys, {name: chi[name] for name in components}).replace_schema_metadata(
        _meta(components, layers, estimator=estimator))


class DatasetRun(NamedTuple):
    """The chains of an independent dataset-level run and the probe of each token they observed."""

    stats: dict[str, list[ChainStats]]
    token_probe: np.ndarray  # [T_dataset] index into the study's probe names
    source: str  # how the run was made (seed, draws, batch), recorded in the table's metadata


def response_table(probe_names: list[str], token_probe: np.ndarray, half: np.ndarray,
                   stats: dict[str, list[ChainStats]], chi: dict[str, np.ndarray], components: list[str],
                   layers: dict[str, int], delta_h: float, dataset: DatasetRun | None = None) -> pa.Table:
    """Long response matrix: one row per (probe, component), raw, standardised, SE, mixture estimate.

    token_probe: [T] index into probe_names of each probe token; half: [T] "a"/"b" (see token_keys).
    ``chi`` is the mean χ̂_xy over all the probe's tokens; ``chi_mixture`` the δh-mixture estimate
    -Cov[g, ΔL_h] (an estimate of δh·χ) on the probe's half-b contexts: from the independent run
    ``dataset`` when given, else from the per-token run's own chains (NaN for a probe with a single
    context, which leaves no half b).
    """
    n_probes = len(probe_names)
    counts = np.bincount(token_probe, minlength=n_probes)
    raw = np.stack([probe_means(chi[c], token_probe, n_probes) for c in components], axis=1)
    std = zscore(raw)
    records = []
    held_out = np.asarray(half) == "b"
    for j, comp in enumerate(components):
        for i, probe in enumerate(probe_names):
            weights = (token_probe == i) / counts[i]
            ref = reference(stats, comp)
            se = mixture_chi(stats[comp], ref, weights, 1.0).se  # the probe's mean χ̂ is the δh = 1 mixture
            if dataset is None:  # NaN for a probe with no half-b context: nothing held out to compare with
                mix_tokens = (token_probe == i) & held_out
                mixture = (mixture_chi(stats[comp], ref, mix_tokens / mix_tokens.sum(), delta_h).value
                           if mix_tokens.any() else float("nan"))
            else:
                mix_tokens = dataset.token_probe == i
                mixture = mixture_chi(dataset.stats[comp], reference(dataset.stats, comp),
                                      mix_tokens / mix_tokens.sum(), delta_h).value
            records.append({"probe": probe, "component": comp, "layer": layers[comp], "chi": raw[i, j],
                            "chi_se": se, "chi_std": std[i, j], "chi_mixture": mixture,
                            "n_tokens": int(counts[i])})
    source = "per-token run's chains, half-b contexts" if dataset is None else dataset.source
    return pa.Table.from_pylist(records).replace_schema_metadata(
        _meta(components, layers, delta_h=delta_h, standardisation="z-score per component over probes",
              chi_mixture_source=source))


def chain_sums_table(stats: dict[str, list[ChainStats]], chains: dict[str, list[int]]) -> pa.Table:
    """chain_sums: one row per (component, chain) with the sums every estimate is made of (count, Σg,
    Σg·a_t [T], Σa_t [T], divergence), so that an analysis can resample chains (a bootstrap) without
    rerunning them, and the chain's g trace [count] (g = L_n(draw) − L_n(w*), nats: the report's SGLD
    traces)."""
    records = [{"component": comp, "chain": chain, "count": s.count, "sum_g": s.sum_g, "diverged": bool(s.diverged),
                "sum_ga": s.sum_ga, "sum_a": s.sum_a, "g_trace": s.g_trace}
               for comp in sorted(stats) for chain, s in zip(chains[comp], stats[comp])]
    lists = {name: pa.array([r[name] for r in records], pa.list_(pa.float64()))
             for name in ("sum_ga", "sum_a", "g_trace")}
    return pa.table({"component": [r["component"] for r in records], "chain": [r["chain"] for r in records],
                     "count": [r["count"] for r in records], "sum_g": [r["sum_g"] for r in records],
                     "diverged": [r["diverged"] for r in records], **lists})


def token_response_table(keys: dict, chi: dict[str, np.ndarray], se: dict[str, np.ndarray],
                         rows: np.ndarray, components: list[str], layers: dict[str, int]) -> pa.Table:
    """Response matrix of the `tokens` family: each sampled probe token (indices ``rows``) is a row."""
    names = [f"{keys['probe'][t]}#{keys['context_id'][t]}:{keys['position'][t]}" for t in rows]
    raw = np.stack([chi[c][rows] for c in components], axis=1)
    std = zscore(raw)
    records = [{"probe": names[i], "component": comp, "layer": layers[comp], "chi": raw[i, j],
                "chi_se": float(se[comp][t]), "chi_std": std[i, j], "chi_mixture": float("nan"), "n_tokens": 1}
               for j, comp in enumerate(components) for i, t in enumerate(rows)]
    return pa.Table.from_pylist(records).replace_schema_metadata(_meta(components, layers, family="tokens"))


def diagnostics_table(stats: dict[str, list[ChainStats]], nbeta: float, chains: dict[str, list[int]],
                      flags: dict[str, list[dict]] | None = None) -> pa.Table:
    """One row per (component, chain): R-hat of the component's run, per-chain ESS, divergence, LLC, and the
    screening ``flags`` (``workflows.screening``: chains it excluded count as not diverged, ``excluded``)."""
    records = []
    for comp in sorted(stats):
        kept = [c for c in stats[comp] if not c.diverged]
        run = convergence(stats[comp]) if len(kept) > 1 and kept[0].count >= MIN_DRAWS else None
        pooled = llc(stats[comp], nbeta) if kept else None
        for i, (chain, s) in enumerate(zip(chains[comp], stats[comp])):
            screened = flags[comp][i] if flags else {}
            records.append({
                "component": comp, "chain": chain,
                "rhat": float(run.rhat) if run else float("nan"),
                "ess": float(ess(s.g_trace[None, :])) if s.count >= MIN_DRAWS else float("nan"),
                "diverged": bool(s.diverged and not screened.get("excluded")),
                "diverged_step": -1 if screened.get("excluded") else int(s.diverged_step),
                **screened,
                "llc": nbeta * s.sum_g / s.count, "mean_g": s.sum_g / s.count,
                "llc_run": float(pooled.value) if pooled else float("nan"),
                "llc_run_se": float(pooled.se) if pooled else float("nan"),
                "loss_star": s.loss_star,
            })
    return pa.Table.from_pylist(records).replace_schema_metadata(
        {"llc": json.dumps("weight-refined LLC nβ·mean g for components, ordinary LLC for 'full'")})


def per_token(stats: dict[str, list[ChainStats]], components: list[str]) -> tuple[dict, dict]:
    """χ̂_xy and its standard error across chains for every component: ({c: [T]}, {c: [T]}).
    Centred on the full run when ``stats`` has one, else on each component's own chains."""
    chi, se = {}, {}
    for comp in components:
        try:
            est = per_token_chi(stats[comp], reference(stats, comp))
        except ValueError as err:
            raise ValueError(f"component {comp}: {err}") from err
        chi[comp], se[comp] = np.asarray(est.value), np.asarray(est.se)
    return chi, se


def write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")
