"""End-to-end studies on a tiny model over the real corpus: outputs, Ray = in-process, worker crash,
resume after interruption, config errors, multirun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import workflows.pipeline as pipeline
import workflows.study as study

N_CHAINS, N_PROBES, CTX_PER_PROBE, SEQ = 2, 3, 2, 8
SMALL = [
    f"sampler.n_chains={N_CHAINS}", "sampler.n_draws=6", "sampler.batch_size=4",
    "data.sgld_contexts=32", "data.observable_contexts=4", f"data.seq_len={SEQ}",
    "perturbation=synthetic", f"perturbation.contexts_per_probe={CTX_PER_PROBE}",
    "units.components_per_unit=2", "report=false", "head_roles.n_seqs=2", "head_roles.half_len=6",
]


def compose_study(tmp_path, checkpoint, corpus_dir, *overrides, name="run"):
    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = compose("study", overrides=[f"model.checkpoint={checkpoint}", f"data.corpus_dir={corpus_dir}",
                                          f"run_dir={tmp_path / name}", f"cache_dir={tmp_path / 'cache'}",
                                          *SMALL, *overrides])
    return OmegaConf.to_object(cfg)


def tables(run_dir):
    return {name: pq.read_table(run_dir / f"{name}.parquet")
            for name in ("response_matrix", "token_susceptibilities", "diagnostics", "head_roles", "ablation")}


def assert_same_results(a, b):
    """Bitwise-equal tables (NaN, e.g. an undefined drift_z, equal to NaN in the same cell)."""
    for name in ("response_matrix", "token_susceptibilities", "diagnostics"):
        assert a[name].schema.equals(b[name].schema), f"{name} schema differs"
        assert a[name].to_pandas().equals(b[name].to_pandas()), f"{name} differs"


@pytest.fixture
def inprocess_run(tmp_path, tiny_checkpoint, corpus_dir):
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", name="inprocess")
    summary = study.run(cfg)
    return cfg, summary, tables(tmp_path / "inprocess")


def test_outputs_have_the_right_shapes(inprocess_run):
    cfg, summary, out = inprocess_run
    n_comp = 4  # L0H0 L0H1 L1H0 L1H1
    n_tokens = N_PROBES * CTX_PER_PROBE * SEQ
    assert out["response_matrix"].num_rows == N_PROBES * n_comp
    assert set(out["response_matrix"].column("probe").to_pylist()) == {"induction", "brackets", "digits"}
    tok = out["token_susceptibilities"]
    assert tok.num_rows == n_tokens
    assert [c for c in tok.column_names if c.startswith("L")] == ["L0H0", "L0H1", "L1H0", "L1H1"]
    assert b"components" in tok.schema.metadata and b"layers" in tok.schema.metadata
    assert np.isfinite(tok.column("L1H1").to_numpy()).all() and np.abs(tok.column("L1H1").to_numpy()).max() > 0
    assert out["diagnostics"].num_rows == (n_comp + 1) * N_CHAINS
    assert out["head_roles"].num_rows == n_comp and out["ablation"].num_rows == n_tokens
    # the dataset-level χ is the mean of the per-token χ over the probe's tokens
    rm = out["response_matrix"].to_pandas().set_index(["probe", "component"])
    tk = tok.to_pandas()
    for probe in ("induction", "digits"):
        assert rm.loc[(probe, "L0H1"), "chi"] == pytest.approx(tk[tk.probe == probe]["L0H1"].mean(), rel=1e-9)
    assert summary["units_computed"] == summary["units_total"] == 3 * N_CHAINS  # 5 components in groups of 2
    manifest = json.loads((Path(cfg.run_dir) / "manifest.json").read_text())
    assert manifest["hashes"]["model"] and len(manifest["units"]) == summary["units_total"]
    import torch

    assert manifest["packages"]["torch"] == torch.__version__
    assert manifest["packages"]["ray"] and manifest["packages"]["numpy"] and manifest["device"] == "cpu"
    assert manifest["code_source"] == "git" and len(manifest["code_version"]) == 40
    assert isinstance(manifest["dirty"], bool) and manifest["device_name"]


def test_ray_equals_inprocess_even_when_a_worker_dies(inprocess_run, tmp_path, tiny_checkpoint, corpus_dir, ray_session):
    _, _, expected = inprocess_run
    kill_dir = tmp_path / "kills"
    kill_dir.mkdir()
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=local", f"cache_dir={tmp_path / 'ray_cache'}",
                        f"+cluster.kill_worker_once_dir={kill_dir}", name="ray")
    study.run(cfg)
    assert (kill_dir / "killed").exists()  # one worker process died mid-study; Ray re-ran its unit
    assert_same_results(tables(tmp_path / "ray"), expected)


def test_interrupted_study_resumes_and_recomputes_only_missing_units(tmp_path, tiny_checkpoint, corpus_dir, monkeypatch):
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", name="first")
    calls = {"n": 0}
    real_task = pipeline.unit_task

    def interrupted(unit, shared, on_progress):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_task(unit, shared, on_progress)

    monkeypatch.setattr(pipeline, "unit_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study.run(cfg)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 3  # the two finished units and the pre-flight kept
    monkeypatch.setattr(pipeline, "unit_task", real_task)
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", name="second")
    summary = study.run(cfg)
    assert (summary["units_cached"], summary["units_computed"]) == (2, summary["units_total"] - 2)
    again = study.run(compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", name="third"))
    assert again["units_computed"] == 0
    fresh = study.run(compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess",
                                    f"cache_dir={tmp_path / 'fresh'}", name="fresh"))
    assert fresh["units_computed"] == fresh["units_total"]
    assert_same_results(tables(tmp_path / "second"), tables(tmp_path / "fresh"))
    # every unit read from the cache ("third") gives what every unit handed over as computed gives ("fresh")
    assert_same_results(tables(tmp_path / "third"), tables(tmp_path / "fresh"))


@pytest.mark.parametrize("override, message", [
    ("sampler.nbeeta=3", "nbeeta"),
    ("sampler.n_chains=two", "n_chains"),
    ("cluster.adress=auto", "adress"),
])
def test_config_errors_name_the_key(override, message):
    with initialize_config_module(version_base="1.3", config_module="conf"):
        with pytest.raises(ConfigCompositionException, match=message):
            compose("study", overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("data.seq_len=-5", "data.seq_len must be 0"),
    ("units.chains_per_unit=-1", "units.components_per_unit and units.chains_per_unit must be >= 0"),
    ("units.probe_shards=0", "units.probe_shards >= 1"),
])
def test_out_of_range_sizes_fail_naming_the_key(override, message):
    """Values of the right type but out of range fail when the config becomes the study's dataclasses."""
    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = compose("study", overrides=[override, "run_dir=unused"])
    with pytest.raises(Exception, match=message):
        OmegaConf.to_object(cfg)


def test_unknown_component_lists_valid_names(tmp_path, tiny_checkpoint, corpus_dir):
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", "components.names=[L7H0]")
    with pytest.raises(ValueError, match="L1H1"):
        study.run(cfg)


def test_unknown_probe_domain_lists_available(tmp_path, tiny_checkpoint, corpus_dir):
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess",
                        "perturbation.probes=[{name: x, domains: [klingon]}]")
    with pytest.raises(ValueError, match="klingon.*shakespeare"):
        study.run(cfg)


def _multirun(tmp_path, tiny_checkpoint, corpus_dir, *sweep_args):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "workflows.study", "-m", *sweep_args, "cluster=inprocess",
           f"model.checkpoint={tiny_checkpoint}", f"data.corpus_dir={corpus_dir}", f"cache_dir={tmp_path / 'cache'}",
           f"hydra.sweep.dir={sweep}", *SMALL]
    return sweep, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_two_job_multirun_writes_a_sweep_summary(tmp_path, tiny_checkpoint, corpus_dir):
    long_label = "x" * 300  # a long override value: job folders are named by job number, never by overrides
    sweep, done = _multirun(tmp_path, tiny_checkpoint, corpus_dir, "sampler.nbeta=10,30", f"+note={long_label}")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = pq.read_table(sweep / "sweep_summary.parquet").to_pandas().sort_values("job")
    assert list(summary.job) == [0, 1] and list(summary.status) == ["ok", "ok"]
    first, second = summary.overrides
    assert "sampler.nbeta=10" in first.split() and "sampler.nbeta=30" in second.split()
    assert list(summary["override:sampler.nbeta"]) == ["10", "30"] and summary["override:+note"].iloc[0] == long_label
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for run_dir in summary.run_dir:
        assert (Path(run_dir) / "response_matrix.parquet").exists()
    # nβ scales the LLC: different sweeps give different estimates
    assert summary.llc_full.iloc[0] != summary.llc_full.iloc[1]


def test_a_failed_sweep_job_has_its_row_and_its_log(tmp_path, tiny_checkpoint, corpus_dir):
    sweep, done = _multirun(tmp_path, tiny_checkpoint, corpus_dir, "components.names=[L0H0],[L9H9]")
    assert done.returncode != 0
    summary = pq.read_table(sweep / "sweep_summary.parquet").to_pandas().sort_values("job")
    assert list(summary.status) == ["ok", "failed"]
    assert "unknown component 'L9H9'" in summary.error.iloc[1] and summary.error.iloc[0] == ""
    assert "unknown component 'L9H9'" in (sweep / "1" / "study.log").read_text()


def test_single_context_probes_leave_the_dataset_level_check_skipped(tmp_path, tiny_checkpoint, corpus_dir):
    """With one context per probe there is no held-out half b: chi_mixture is NaN and the slope check says
    "skipped" instead of comparing the estimate with itself."""
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", "perturbation.contexts_per_probe=1",
                        "report=true")
    study.run(cfg)
    assert np.isnan(pq.read_table(tmp_path / "run" / "response_matrix.parquet").column("chi_mixture").to_numpy()).all()
    checks = {c["name"]: c for c in json.loads((tmp_path / "run" / "analysis.json").read_text())["checks"]}
    assert checks["aggregated per-token vs dataset-level χ"]["status"] == "skipped"


def test_studies_started_together_get_their_own_run_folders(tmp_path, tiny_checkpoint, corpus_dir):
    """Two studies started in the same second write two run folders (the folder name carries the process id),
    each with its own config and manifest."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "workflows.study", "cluster=inprocess", f"model.checkpoint={tiny_checkpoint}",
           f"data.corpus_dir={corpus_dir}", f"cache_dir={tmp_path / 'cache'}", *SMALL]
    jobs = [subprocess.Popen([*cmd, f"sampler.nbeta={nbeta}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True) for nbeta in (10, 30)]
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read()[-3000:]
    runs = sorted((tmp_path / "outputs" / "study").iterdir())
    assert len(runs) == 2
    nbetas = sorted(json.loads((r / "manifest.json").read_text())["config"]["sampler"]["nbeta"] for r in runs)
    assert nbetas == [10.0, 30.0]


def test_unstable_sampler_stops_at_the_preflight_before_any_chain(tmp_path, tiny_checkpoint, corpus_dir):
    """The audit's case (step 10, no localisation) exited 0 with every check "pass"; the pre-flight now names the
    components and the step size that passes, and only the pre-flight's result is cached."""
    cfg = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", "sampler.step_size=10",
                        "sampler.gamma=0", "components.include_full=false")
    with pytest.raises(RuntimeError, match=r"curvature pre-flight: SGLD is unstable for [1-4] of 4 component.*"
                                           r"step_size <= "):
        study.run(cfg)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    dropped = compose_study(tmp_path, tiny_checkpoint, corpus_dir, "cluster=inprocess", "sampler.step_size=10",
                            "sampler.gamma=0", "components.include_full=false", "sampler.divergence_policy=drop",
                            name="dropped")
    with pytest.raises(ValueError, match="component L.H.: no chain left to estimate from"):
        study.run(dropped)
    diagnostics = pq.read_table(tmp_path / "dropped" / "diagnostics.parquet").to_pylist()
    unstable = [row for row in diagnostics if row["unstable"]]
    assert unstable and all(row["excluded"] and row["stability"] > 2 for row in unstable)


def test_provenance_reads_the_image_commit_without_git(tmp_path, monkeypatch):
    import workflows.runtime as runtime

    monkeypatch.setattr(runtime, "_git", lambda *args: None)
    monkeypatch.setenv(runtime.CODE_COMMIT_ENV, "abc123")
    got = runtime.provenance("cpu")
    assert (got["code_version"], got["code_source"], got["dirty"]) == ("abc123", "image", None)
    monkeypatch.delenv(runtime.CODE_COMMIT_ENV)
    assert runtime.provenance("cpu")["code_version"] == "unknown"
