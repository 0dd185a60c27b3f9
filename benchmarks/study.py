"""Benchmark of the main job: wall time of the default study, and Ray scaling from 1 to 2 workers.

    python benchmarks/study.py [hydra overrides for the scaling study ...]

1. The default study exactly as ``scripts/study.sh`` runs it (local Ray, every core), with an empty
   unit cache so nothing is reused: its wall time (target < 5 min on a 2-core machine).
2. Scaling: the same study on a local Ray runtime with 1 CPU, then with 2 CPUs (one unit per CPU,
   one torch thread per unit), side by side in this run: efficiency = T1 / (2·T2) (target >= 80%).
3. The FLOPs the batched engine executes in the study (counted from the model's shapes, see
   benchmarks/engine.py) over its wall time, against the single-thread matmul peak times the workers,
   measured in this run.
Prints ONE JSON object as its last line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from hydra import compose, initialize_config_module  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from benchmarks.engine import matmul_peak, unit_flops  # noqa: E402
import workflows.study as study  # noqa: E402


def study_config(run_dir: Path, cache: Path, overrides: list[str]):
    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = compose("study", overrides=[f"run_dir={run_dir}", f"cache_dir={cache}", "report=false", *overrides])
    return OmegaConf.to_object(cfg)


def timed_study(cfg, num_cpus: int | None) -> float:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cfg.cluster.num_cpus = num_cpus
    start = time.perf_counter()
    study.run(cfg)
    wall = time.perf_counter() - start
    ray.shutdown()
    return wall


def study_flops(cfg) -> float:
    """Matmul FLOPs the batched engine executes in a study of heads + the full run: every component ×
    chain × draw unit of work (``benchmarks.engine.unit_flops``, grouped as the study's units group the
    chains; burn-in steps, none by default, are not counted)."""
    from susc_core.model.checkpoint import load_model
    from susc_core.model.components import component, is_head, resolve_components

    model_cfg, _ = load_model(cfg.model.checkpoint)
    seq = cfg.data.seq_len or model_cfg.n_ctx
    names = resolve_components(model_cfg, list(cfg.components.names))
    if not all(is_head(name) for name in names):
        raise ValueError(f"the FLOP count models heads + full; the study's components are {names}")
    n_probe = cfg.perturbation.contexts_per_probe * len(cfg.perturbation.probes)
    obs_tokens = (cfg.data.observable_contexts + n_probe) * seq
    per_unit = unit_flops(model_cfg, cfg.sampler, seq, obs_tokens, [component(model_cfg, n).layer for n in names],
                          "batched", cfg.model.loss_chunk_tokens, cfg.units.chains_per_unit)
    return per_unit * (len(names) + 1) * cfg.sampler.n_chains * cfg.sampler.n_draws


def main(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        default = study_config(tmp / "default", tmp / "cache_default", [])
        wall_default = timed_study(default, None)
        scaling = [study_config(tmp / f"w{n}", tmp / f"cache_w{n}", overrides) for n in (1, 2)]
        t1 = timed_study(scaling[0], 1)
        t2 = timed_study(scaling[1], 2)
    torch.set_num_threads(1)
    peak_1thread = matmul_peak("cpu")
    flops = study_flops(default)
    workers = os.cpu_count() or 1
    figures = {
        "default_study_wall_s": round(wall_default, 1),
        "default_study_under_5_min": wall_default < 300,
        "scaling_t1_s": round(t1, 1), "scaling_t2_s": round(t2, 1),
        "ray_scaling_efficiency_1_to_2": round(t1 / (2 * t2), 3),
        "default_study_executed_gflop": round(flops / 1e9, 1),
        "matmul_peak_gflops_per_thread": round(peak_1thread / 1e9, 1),
        "fraction_of_matmul_peak": round(flops / wall_default / (peak_1thread * workers), 3),
        "workers": workers,
    }
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(sys.argv[1:])
