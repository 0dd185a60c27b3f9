"""One study from its inputs to its run folder: plan -> run -> reduce -> write.

``run_study(cfg, inputs)`` is the one path every entry point takes: the Hydra app (``workflows.study``)
after reading the model and corpus from files, the notebook API (``workflows.api``) with a model and
tokens in memory. It plans units (component group × chain group × probe shard), runs the missing ones
on Ray (or in process), caching each as it finishes, reduces them in a fixed order through the
estimators, and writes the Parquet outputs, manifest and HTML report into ``cfg.run_dir``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from susc_core.adapters.engine import adapter_preflight_curvature, run_adapter_unit
from susc_core.adapters.load import AdapterSpec, load_adapter
from susc_core.model.components import FULL, expand_names
from susc_core.engine.chains import OnProgress
from susc_core.engine.inputs import UnitContexts
from susc_core.engine.seeds import study_generator
from susc_core.engine.sgld import SamplerConfig
from susc_core.engine.unit import NUMERICS_VERSION, preflight_curvature, run_unit
from susc_core.model.head_roles import ablation_loss_deltas, head_labels, measured_roles
from susc_core.engine.memory import peak_memory_mib
from workflows import outputs, screening
from workflows.execute import RunReport, run_units
from workflows.plan import WorkUnit, plan_units, content_hash
from workflows.reduce import collect, to_fields
from workflows.runtime import get_logger, provenance, resolve_device
from workflows.study_config import DiagnosticsSection, StudyConfig
from workflows.study_data import StudyInputs
from workflows.unit_store import UnitStats, UnitStore

log = get_logger("study")


def _chunk_tokens(shared: dict, device: torch.device) -> int:
    """Vocabulary rows per block for the bundled model on ``device`` (a GPU takes whole chains: speed only)."""
    return shared["cuda_loss_chunk_tokens" if device.type == "cuda" else "loss_chunk_tokens"]


def _adapter(shared: dict):
    """The study's ``ModelAdapter``: loaded once per worker process from its ``AdapterSpec`` (``load_adapter``
    keeps it), or the in-memory adapter a notebook study sent along (``workflows.api``)."""
    adapter = shared["adapter"]
    return load_adapter(adapter) if isinstance(adapter, AdapterSpec) else adapter


def unit_task(unit: WorkUnit, shared: dict, on_progress: OnProgress) -> dict:
    """Ray task body (plain Python): SGLD chains of one unit on its probe shard -> cacheable fields.

    The bundled model's weights travel in ``shared``; an adapter model travels as its ``AdapterSpec``
    (or as the adapter itself, for a model built in memory). on_progress: (chain·draws done, of the unit)."""
    contexts = UnitContexts(shared["train"], shared["obs"], shared["probe_shards"][unit.shard])
    args = (list(unit.components), list(unit.chains), shared["sampler"], contexts, shared["seed"])
    device = resolve_device(shared["device"])  # resolved where the unit runs
    if shared["adapter"] is None:
        stats = run_unit(shared["model_cfg"], shared["w_star"], *args, device=device,
                         chunk_tokens=_chunk_tokens(shared, device), on_progress=on_progress)
    else:
        stats = run_adapter_unit(_adapter(shared), *args, device=device,
                                 memory_budget_mib=shared["memory_budget_mib"], on_progress=on_progress)
    return to_fields(stats)


def preflight_task(unit: WorkUnit, shared: dict, on_progress: OnProgress) -> dict:
    """Ray task body: the curvature pre-flight of the unit's components -> {(name, -1): {"curvature": λ}}
    (it takes no draws, so it reports none: ``on_progress`` is unused)."""
    d = shared["diagnostics"]
    args = (list(unit.components), shared["train"], d.preflight_contexts, d.preflight_iters, d.preflight_fd_step,
            shared["seed"])
    device = resolve_device(shared["device"])
    if shared["adapter"] is None:
        curvature = preflight_curvature(shared["model_cfg"], shared["w_star"], *args, device=device,
                                        chunk_tokens=_chunk_tokens(shared, device))
    else:
        curvature = adapter_preflight_curvature(_adapter(shared), *args, device=device)
    return {(name, -1): {"curvature": np.asarray(value)} for name, value in curvature.items()}


def _preflight(cfg: StudyConfig, inputs: StudyInputs, planned: list[str], store: UnitStore, shared: dict) -> dict:
    """{component: ε(nβλ + γ)} from the curvature pre-flight (cached like a unit; {} when switched off).
    Under divergence_policy "fail" an unstable component stops the study here, before any chain runs."""
    d = cfg.diagnostics
    if d.preflight_iters == 0:
        return {}
    settings = {k: getattr(d, k) for k in ("preflight_iters", "preflight_contexts", "preflight_fd_step")}
    fingerprint = {k: v for k, v in _fingerprint(cfg, inputs).items() if k not in ("sampler", "probes", "shards")}
    unit = WorkUnit(tuple(planned), (), 0, content_hash({"preflight": fingerprint, **settings}))
    log.info("curvature pre-flight: %d components, %d power iterations on %d contexts", len(planned),
             d.preflight_iters, d.preflight_contexts)
    report = run_units([unit], preflight_task, shared, cfg.cluster, store)
    curvature = {name: float(fields["curvature"]) for (name, _), fields in report.stats[unit.key].items()}
    return screening.check_preflight(curvature, cfg.sampler, d)


def _head_roles(inputs: StudyInputs, cfg: StudyConfig) -> tuple[pa.Table, np.ndarray | None]:
    """head_roles table (attention scores, the multigram measure, the role census) and ablation deltas
    [heads, T] on the probe tokens (bundled model only). The multigram measure's natural text is the probe
    contexts of ``head_roles.census.natural_domains`` in this study (roles from the scores alone when it has none)."""
    mc, hr = inputs.model_cfg, cfg.head_roles
    labels = head_labels(mc)
    natural = np.isin(np.asarray(inputs.probe_rows.column("domain").to_pylist(), dtype=object),
                      hr.census.natural_domains)
    scores, effects, roles = measured_roles(inputs.w_star, mc, inputs.probe[torch.from_numpy(natural)], hr.census,
                                            hr.n_seqs, hr.half_len, study_generator(cfg.seed, "head_roles:scores"),
                                            study_generator(cfg.seed, "head_roles:repeat"), cfg.model.loss_chunk_tokens)
    table = pa.table({"component": labels, "layer": [i // mc.n_heads for i in range(len(labels))],
                      "head": [i % mc.n_heads for i in range(len(labels))], **scores,
                      "ablation_natural": effects["natural"], "ablation_repeat": effects["repeat"], "role": roles})
    deltas = ablation_loss_deltas(inputs.w_star, mc, inputs.probe, cfg.model.loss_chunk_tokens) if hr.ablation else None
    return table, (deltas.reshape(len(labels), -1).numpy() if deltas is not None else None)


def _write_head_roles(inputs: StudyInputs, cfg: StudyConfig, keys: dict, run_dir: Path) -> None:
    """head_roles.parquet and ablation.parquet (per-token keys ``keys``), for the bundled model only."""
    if inputs.model_cfg is None:
        log.info("head roles and zero-ablation deltas are computed for the bundled model only; skipped for the "
                 "%s model (no head_roles.parquet or ablation.parquet)", inputs.model_label)
        return
    roles, deltas = _head_roles(inputs, cfg)
    outputs.write_parquet(roles, run_dir / "head_roles.parquet")
    if deltas is not None:
        ablation = outputs.per_token_table({k: keys[k] for k in ("probe", "context_id", "position")},
                                           dict(zip(roles.column("component").to_pylist(), deltas)))
        outputs.write_parquet(ablation, run_dir / "ablation.parquet")


def _shared(cfg: StudyConfig, inputs: StudyInputs) -> dict:
    shards = [s for s in torch.tensor_split(inputs.probe, cfg.units.probe_shards) if len(s)]
    if len(shards) != cfg.units.probe_shards:
        raise ValueError(f"units.probe_shards={cfg.units.probe_shards} exceeds the {len(inputs.probe)} probe contexts")
    return {"model_cfg": inputs.model_cfg, "w_star": inputs.w_star, "adapter": inputs.adapter,
            "memory_budget_mib": cfg.model.memory_budget_mib, "loss_chunk_tokens": cfg.model.loss_chunk_tokens,
            "cuda_loss_chunk_tokens": cfg.model.cuda_loss_chunk_tokens,
            "sampler": cfg.sampler, "diagnostics": cfg.diagnostics, "train": inputs.train,
            "obs": inputs.obs, "probe_shards": shards, "seed": cfg.seed, "device": cfg.model.device}


def _fingerprint(cfg: StudyConfig, inputs: StudyInputs) -> dict:
    """What every unit's statistics depend on besides its own components, chains and shard."""
    out = {"sampler": asdict(cfg.sampler), "hashes": inputs.hashes, "seed": cfg.seed, "data": asdict(cfg.data),
           "probes": inputs.probe_rows.select(["probe", "domain", "context_id"]).to_pydict(),
           "shards": cfg.units.probe_shards, "numerics": NUMERICS_VERSION}
    if inputs.adapter is not None:  # adapter options change results (memory budget: float rounding only)
        adapter = inputs.adapter
        options = asdict(adapter) if isinstance(adapter, AdapterSpec) else {
            "class": type(adapter).__name__, "loss_chunk_tokens": adapter.loss_chunk_tokens}  # weights: hashes
        out["adapter"] = options | {"memory_budget_mib": cfg.model.memory_budget_mib}
    return out


@dataclass
class StudyPlan:
    """What a study computes: its components (without "full"), every sampled component, its units."""

    components: list[str]
    planned: list[str]  # components + "full" when the study has the full run
    units: list[WorkUnit]


@dataclass
class Sampled:
    """The run stage's result: screened per-(component, chain) statistics and how the units went."""

    stats: dict  # component -> [ChainStats] in chain order (flagged chains excluded under "drop")
    diagnostics: pa.Table  # one row per (component, chain), with the screening flags
    dataset: outputs.DatasetRun | None  # the independent dataset-level run, when enabled
    report: RunReport


def plan_study(cfg: StudyConfig, inputs: StudyInputs) -> StudyPlan:
    """Expand the component names and split (components × chains × probe shards) into work units."""
    components = [c for c in expand_names(inputs.component_names, list(cfg.components.names)) if c != FULL]
    if not components:
        raise ValueError(f"components.names={list(cfg.components.names)} selects no component besides 'full'")
    planned = components + ([FULL] if cfg.components.include_full else [])
    units = plan_units(planned, cfg.sampler.n_chains, cfg.units.probe_shards, cfg.units.components_per_unit,
                       cfg.units.chains_per_unit, _fingerprint(cfg, inputs))
    return StudyPlan(components, planned, units)


def run_plan(cfg: StudyConfig, inputs: StudyInputs, plan: StudyPlan, run_dir: Path) -> Sampled:
    """Pre-flight, every missing unit (cached as it finishes), screening; writes ``diagnostics.parquet``
    before the divergence policy can stop the study, then the dataset-level run when enabled."""
    store = UnitStore(cfg.cache_dir, cfg.cluster.claim_stale_s)
    shared = _shared(cfg, inputs)
    stability = _preflight(cfg, inputs, plan.planned, store, shared)
    report = run_units(plan.units, unit_task, shared, cfg.cluster, store)
    stats, diagnostics = _screened(plan.units, report.stats, stability, cfg.sampler, cfg.diagnostics,
                                   run_dir / "diagnostics.parquet")
    dataset = (_dataset_level_run(cfg, inputs, plan.planned, store, run_dir, stability)
               if cfg.dataset_level.enabled else None)
    return Sampled(stats, diagnostics, dataset, report)


def _screened(units: list[WorkUnit], loaded: dict[str, UnitStats], stability: dict[str, float],
              sampler: SamplerConfig, diagnostics_cfg: DiagnosticsSection, path: Path) -> tuple[dict, pa.Table]:
    """The finished units' per-(component, chain) statistics (``loaded``: unit key -> statistics, from
    ``run_units``), screened (``screening.screen``); their diagnostics table is written to ``path`` before the
    divergence policy (enforced last) can stop the study. Returns (component -> [ChainStats], the diagnostics table)."""
    screened = screening.screen(collect(units, loaded), stability, sampler, diagnostics_cfg)
    chains = {comp: list(range(sampler.n_chains)) for comp in screened.stats}
    diagnostics = outputs.diagnostics_table(screened.stats, sampler.nbeta, chains, screened.flags)
    outputs.write_parquet(diagnostics, path)
    screening.enforce(screened, chains, sampler.divergence_policy)
    return screened.stats, diagnostics


def reduce_tables(cfg: StudyConfig, inputs: StudyInputs, plan: StudyPlan, sampled: Sampled,
                  keys: dict) -> dict[str, pa.Table]:
    """The estimators over the screened statistics: {file stem: table} of the per-token table, the response
    matrix (probes or sampled tokens as rows) and the per-chain sums. keys: ``outputs.token_keys``."""
    stats, components = sampled.stats, plan.components
    layers = outputs.layers_of(inputs.n_layers, components)
    chi, se = outputs.per_token(stats, components)
    probe_names = list(dict.fromkeys(keys["probe"]))
    token_probe = np.asarray([probe_names.index(p) for p in keys["probe"]])
    estimator = outputs.ESTIMATORS[FULL in stats]
    if cfg.perturbation.family == "tokens":
        rng = study_generator(cfg.seed, "tokens:rows")
        per_probe = [np.flatnonzero(token_probe == i) for i in range(len(probe_names))]
        rows = np.sort(np.concatenate([rng.choice(r, min(cfg.perturbation.tokens_per_probe, len(r)), replace=False)
                                       for r in per_probe]))
        matrix = outputs.token_response_table(keys, chi, se, rows, components, layers)
    else:
        matrix = outputs.response_table(probe_names, token_probe, keys["half"], stats, chi, components, layers,
                                         cfg.perturbation.delta_h, sampled.dataset)
    chains = {comp: list(range(cfg.sampler.n_chains)) for comp in stats}
    return {"token_susceptibilities": outputs.token_table(keys, chi, components, layers, estimator),
            "response_matrix": matrix, "chain_sums": outputs.chain_sums_table(stats, chains)}


def run_study(cfg: StudyConfig, inputs: StudyInputs, resolved: dict | None = None) -> dict:
    """Run one study on loaded ``inputs`` into ``cfg.run_dir``; returns its summary (also the sweep-summary
    row). ``resolved``: the config as a dict for the manifest (default: ``cfg`` itself)."""
    start = time.perf_counter()
    check_dataset_level(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    attached = cfg.cluster.executor == "ray" and cfg.cluster.address != "local"
    # on an attached cluster the driver may sit on a CPU head: workers resolve the device themselves
    device = cfg.model.device if attached else str(resolve_device(cfg.model.device))
    plan = plan_study(cfg, inputs)
    log.info("study of the %s model: %d components%s × %d chains × %d draws; %d probe contexts (%d tokens) in "
             "%d shard(s); %d units; device %s", inputs.model_label, len(plan.components),
             " + full" if cfg.components.include_full else " (no full run)", cfg.sampler.n_chains,
             cfg.sampler.n_draws, len(inputs.probe), inputs.probe[:, 1:].numel(), cfg.units.probe_shards,
             len(plan.units), device)
    sampled = run_plan(cfg, inputs, plan, run_dir)
    keys = outputs.token_keys(inputs.probe_rows, inputs.probe.numpy(), inputs.texts)
    for stem, table in reduce_tables(cfg, inputs, plan, sampled, keys).items():
        outputs.write_parquet(table, run_dir / f"{stem}.parquet")
    _write_head_roles(inputs, cfg, keys, run_dir)
    summary = _summary(run_dir, sampled, start)
    manifest = {"config": resolved or asdict(cfg), **provenance(device), "hashes": inputs.hashes,
                "seed": cfg.seed, "units": [asdict(u) for u in plan.units], "where": sampled.report.where,
                "cluster_resources": _cluster_resources(cfg), "timings": summary}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    if cfg.report:
        from workflows.report import write_report

        log.info("report: %s", write_report(run_dir, cfg.analysis))
    log.info("study done in %.1f s (%d units computed, %d cached; peak RSS %.0f MiB in the driver, %.0f MiB in a "
             "unit's process): %s", summary["wall_s"], sampled.report.computed, sampled.report.cached,
             summary["peak_rss_mib_driver"], sampled.report.peak_rss_mib, run_dir)
    return summary


def _summary(run_dir: Path, sampled: Sampled, start: float) -> dict:
    """The study's summary: where its units came from, timings, peak memory, the sampler's health."""
    report, rows = sampled.report, sampled.diagnostics.to_pylist()
    return {
        "run_dir": str(run_dir), "units_total": report.total, "units_cached": report.cached,
        "units_computed": report.computed, "units_seconds": report.seconds, "wall_s": time.perf_counter() - start,
        "llc_full": next((r["llc_run"] for r in rows if r["component"] == FULL), float("nan")),
        "n_diverged": sum(r["diverged"] for r in rows), "n_excluded": sum(r["excluded"] for r in rows),
        "max_rhat": float(np.nanmax(sampled.diagnostics["rhat"].to_numpy())),
        "peak_rss_mib_units": report.peak_rss_mib, "peak_cuda_mib_units": report.peak_cuda_mib,
        "peak_rss_mib_driver": peak_memory_mib("cpu"),
    }


def check_dataset_level(cfg: StudyConfig) -> None:
    """Fail before any work when the independent dataset-level run cannot be made as configured."""
    dl = cfg.dataset_level
    if not dl.enabled:
        return
    if dl.seed == cfg.seed:
        raise ValueError(f"dataset_level.seed={dl.seed} equals the study's seed: its chains would repeat the per-token "
                         "run's; choose another dataset_level.seed")
    if dl.contexts_per_probe < 0:
        raise ValueError(f"dataset_level.contexts_per_probe must be >= 0 (0 = every half-b context), got "
                         f"{dl.contexts_per_probe}")
    if cfg.perturbation.family == "tokens" or cfg.perturbation.contexts_per_probe < 2:
        raise ValueError("dataset_level needs a dataset family (domains or mixture) with perturbation.contexts_per_probe "
                         f">= 2 (half b, every second context, is what it observes); got family="
                         f"{cfg.perturbation.family!r}, contexts_per_probe={cfg.perturbation.contexts_per_probe}")


def _dataset_level_run(cfg: StudyConfig, inputs: StudyInputs, planned: list[str], store: UnitStore,
                       run_dir: Path, stability: dict[str, float]) -> outputs.DatasetRun:
    """The independent dataset-level run: every planned component's chains again, with the seed, draws and
    minibatch size of ``cfg.dataset_level``, observed on each probe's half-b contexts; its units are cached
    like the per-token run's. Writes ``dataset_level_diagnostics.parquet``."""
    dl = cfg.dataset_level
    probes = inputs.probe_rows.column("probe").to_pylist()
    held_out = np.flatnonzero(outputs.context_halves(inputs.probe_rows) == "b")
    if dl.contexts_per_probe:  # the first contexts_per_probe half-b contexts of each probe
        by_probe: dict[str, list[int]] = {}
        for i in held_out:
            by_probe.setdefault(probes[i], []).append(int(i))
        held_out = np.asarray([i for rows in by_probe.values() for i in rows[:dl.contexts_per_probe]])
    sampler = replace(cfg.sampler, n_draws=dl.n_draws, batch_size=dl.batch_size)
    run_cfg = replace(cfg, sampler=sampler, seed=dl.seed, units=replace(cfg.units, probe_shards=1))
    sub = replace(inputs, probe=inputs.probe[torch.from_numpy(held_out)], probe_rows=inputs.probe_rows.take(held_out),
                  texts=[inputs.texts[i] for i in held_out])
    units = plan_units(planned, sampler.n_chains, 1, cfg.units.components_per_unit, cfg.units.chains_per_unit,
                       _fingerprint(run_cfg, sub) | {"run": "dataset_level"})
    log.info("independent dataset-level run: %d components × %d chains × %d draws (batch %d, seed %d) on %d held-out "
             "probe contexts; %d units", len(planned), sampler.n_chains, sampler.n_draws, sampler.batch_size, dl.seed,
             len(held_out), len(units))
    report = run_units(units, unit_task, _shared(run_cfg, sub), cfg.cluster, store)
    stats, _ = _screened(units, report.stats, stability, sampler, cfg.diagnostics,
                         run_dir / "dataset_level_diagnostics.parquet")
    names = list(dict.fromkeys(probes))
    token_probe = np.repeat([names.index(probes[i]) for i in held_out], inputs.probe.shape[1] - 1)
    return outputs.DatasetRun(stats, token_probe, f"independent dataset-level run: seed {dl.seed}, {sampler.n_chains} "
                              f"chains × {dl.n_draws} draws, batch {dl.batch_size}, {len(held_out)} half-b contexts")


def _cluster_resources(cfg: StudyConfig) -> dict:
    if cfg.cluster.executor != "ray":
        return {"executor": cfg.cluster.executor}
    import ray

    return dict(ray.cluster_resources()) if ray.is_initialized() else {}
