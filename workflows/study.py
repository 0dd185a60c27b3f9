"""The main job: ``python -m workflows.study`` turns a config into a response matrix.

A thin layer over ``workflows.pipeline.run_study``, the path the notebook API (``workflows.api``) takes
too: read the model and the corpus slices the config names (``study_data.load_inputs``), then plan ->
run -> reduce -> write into the run directory. With ``-m`` every job of the sweep shares one Ray
runtime and a ``sweep_summary.parquet`` gathers one row per job.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from susc_core.adapters.load import check_supported
from susc_core.model.checkpoint import CheckpointError
from workflows.pipeline import check_dataset_level, run_study
from workflows.runtime import get_logger, register_resolvers
from workflows.study_config import ModelSection, StudyConfig, register
from workflows.study_data import adapter_spec, load_inputs

log = get_logger("study")
register()
register_resolvers()


def check_model(model: ModelSection) -> None:
    """Refuse a model the study cannot run from what names it, before any weight is read: a bundled
    checkpoint that is not a file, an adapter model whose config the adapters do not support."""
    if model.adapter == "bundled":
        if not Path(model.checkpoint).is_file():
            raise CheckpointError(f"model.checkpoint={model.checkpoint} is not a file; give the .safetensors "
                                  "checkpoint of this project's model (or model.adapter=hf / tl for other models)")
        return
    check_supported(adapter_spec(model))


class CheckModelFirst(Callback):
    """Hydra callback (conf/study.yaml): ``check_model`` before Hydra makes the run folder or the sweep
    folder, so a model the study cannot run leaves no empty run behind. Hydra turns a callback's exception
    into a warning, so a refusal exits (``SystemExit``, status 1) with the error's message."""

    @staticmethod
    def _check(config: DictConfig) -> None:
        try:
            check_model(OmegaConf.to_object(config.model))
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
            raise SystemExit(f"study refused: {type(err).__name__}: {err}") from err

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config)


def run(cfg: StudyConfig, resolved: dict | None = None) -> dict:
    """Run the study ``cfg`` names; returns its summary (also the sweep-summary row). ``resolved``: the
    config as a dict, for the manifest."""
    check_dataset_level(cfg)  # before the model and corpus are read
    check_model(cfg.model)
    return run_study(cfg, load_inputs(cfg), resolved)


def append_sweep_row(sweep_dir: Path, row: dict) -> None:
    """Add one job's row to ``sweep_dir/sweep_summary.parquet`` (rewritten whole: it is small); rows may
    differ in columns (a failed job has no timings), missing values are nulls."""
    path = sweep_dir / "sweep_summary.parquet"
    rows = pq.read_table(path).to_pylist() if path.exists() else []
    rows = [r for r in rows if r["job"] != row["job"]] + [row]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), path)


def sweep_row(job: int, overrides: list[str]) -> dict:
    """The identifying part of a sweep-summary row: the job number, its overrides as one string and one
    ``override:<key>`` column per overridden key (its value as given)."""
    pairs = [o.split("=", 1) if "=" in o else (o, "") for o in overrides]
    return {"job": job, "overrides": " ".join(overrides)} | {f"override:{k}": v for k, v in pairs}


@hydra.main(version_base="1.3", config_path="../conf", config_name="study")
def main(cfg: DictConfig) -> dict:
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        summary = run(OmegaConf.to_object(cfg), resolved)
    except (Exception, KeyboardInterrupt) as error:  # the error reaches study.log and the sweep summary
        if isinstance(error, KeyboardInterrupt):
            log.warning("interrupted: every unit that finished is cached in %s; rerun the same command to compute "
                        "only the rest", cfg.cache_dir)
        else:
            log.exception("study failed: %s: %s", type(error).__name__, error)
        if multirun:
            append_sweep_row(Path(hc.sweep.dir), sweep_row(hc.job.num, list(hc.overrides.task))
                             | {"status": "failed", "error": f"{type(error).__name__}: {error}"})
        raise
    if multirun:
        append_sweep_row(Path(hc.sweep.dir), sweep_row(hc.job.num, list(hc.overrides.task))
                         | {"status": "ok", "error": ""} | summary)
    return summary


if __name__ == "__main__":
    main()
