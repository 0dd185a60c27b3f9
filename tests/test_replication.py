"""The replication pipeline on a tiny model (issue 15): the independent dataset-level run, chain sums,
the replication section, and the bootstrap's pieces on numbers with a known answer."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import workflows.study as study
from susc_core.analysis.analyze import analyze, standardized_all
from susc_core.analysis.replication import (chain_sums_by_component, oriented_pc2, resampled_chi)
from susc_core.analysis.results import load_run
from susc_core.analysis.token_classes import extreme_class_shares
from susc_core.analysis.standardize import standardize
from susc_core.stats.chain_stats import from_draws
from susc_core.stats.estimators import per_token_chi
from workflows.outputs import chain_sums_table
from test_study import compose_study

REPLICATION = ["+experiment=replication", "sampler.n_draws=6", "sampler.batch_size=4", "dataset_level.n_draws=5",
               "dataset_level.batch_size=4", "dataset_level.contexts_per_probe=1",
               "analysis.replication.n_bootstrap=8", "cluster=inprocess", "report=true"]


@pytest.fixture(scope="module")
def replication_run(tmp_path_factory, tiny_checkpoint, corpus_dir):
    tmp = tmp_path_factory.mktemp("replication")
    cfg = compose_study(tmp, tiny_checkpoint, corpus_dir, *REPLICATION, "perturbation.contexts_per_probe=2",
                        "analysis.max_tokens_per_probe=0")
    study.run(cfg)
    return cfg, tmp / "run"


def test_experiment_composes_the_paper_settings():
    with initialize_config_module(version_base="1.3", config_module="conf"):
        cfg = OmegaConf.to_object(compose("study", overrides=["+experiment=replication", "run_dir=unused"]))
    s = cfg.sampler
    assert (s.n_chains, s.n_draws, s.step_size, s.nbeta, s.gamma, s.batch_size) == (4, 100, 1e-3, 30.0, 300.0, 16)
    assert {p.name for p in cfg.perturbation.probes} == {
        "shakespeare", "bible", "legal", "code", "docs", "induction", "brackets", "digits"}
    assert len(cfg.perturbation.probes) * cfg.perturbation.contexts_per_probe * 128 >= 16_000  # tokens at n_ctx 128
    assert cfg.components.names == ["L*H*"] and cfg.components.include_full
    assert cfg.dataset_level.enabled and cfg.dataset_level.seed != cfg.seed
    assert cfg.analysis.replication.enabled


def test_dataset_level_run_is_independent_and_feeds_chi_mixture(replication_run):
    cfg, run_dir = replication_run
    response = pq.read_table(run_dir / "response_matrix.parquet")
    meta = json.loads(response.schema.metadata[b"chi_mixture_source"])
    assert meta.startswith("independent dataset-level run: seed 1")
    dl = pq.read_table(run_dir / "dataset_level_diagnostics.parquet")
    main = pq.read_table(run_dir / "diagnostics.parquet")
    assert set(dl.column("component").to_pylist()) == set(main.column("component").to_pylist())
    # own seed and settings: its g traces differ from the per-token run's, chain by chain
    assert not np.allclose(dl.column("mean_g").to_numpy(), main.column("mean_g").to_numpy())
    assert np.isfinite(response.column("chi_mixture").to_numpy()).all()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["dataset_level"]["n_draws"] == 5


def test_replication_section_in_report_and_json(replication_run):
    _, run_dir = replication_run
    summary = json.loads((run_dir / "analysis.json").read_text())
    figures = [r["figure"] for r in summary["replication"]]
    assert any(f.startswith("PC1 variance") for f in figures)
    assert any(f.startswith("R-hat") for f in figures)
    assert all(r["status"] in ("pass", "flag", "info") for r in summary["replication"])
    assert "id='replication'" in (run_dir / "report.html").read_text()
    assert "Replication" in (run_dir / "analysis.md").read_text()


def test_chain_sums_reproduce_the_token_table(replication_run):
    """χ̂ recomputed from chain_sums.parquet (every chain once) equals the study's token table."""
    _, run_dir = replication_run
    tokens = pq.read_table(run_dir / "token_susceptibilities.parquet")
    sums = chain_sums_by_component(pq.read_table(run_dir / "chain_sums.parquet"))
    components = json.loads(tokens.schema.metadata[b"components"])

    class Identity:  # a "resample" that picks each chain exactly once
        @staticmethod
        def integers(low, high, size):
            return np.arange(size)

    chi = resampled_chi(sums, components, Identity())
    for j, comp in enumerate(components):
        np.testing.assert_allclose(chi[:, j], tokens.column(comp).to_numpy(), rtol=1e-12, atol=1e-15)


def test_resampled_chi_matches_the_estimator_on_the_resampled_chains():
    rng = np.random.default_rng(0)
    chains = {name: [from_draws(rng.normal(size=5), rng.normal(size=(5, 7)), 1.0, np.zeros(7)) for _ in range(4)]
              for name in ("L0H0", "full")}
    table = chain_sums_table(chains, {name: [0, 1, 2, 3] for name in chains})
    sums = chain_sums_by_component(table)
    g = np.random.default_rng(3)
    full_pick, comp_pick = g.integers(0, 4, 4), g.integers(0, 4, 4)  # resampled_chi draws the full run first
    expected = per_token_chi([chains["L0H0"][i] for i in comp_pick], [chains["full"][i] for i in full_pick]).value
    np.testing.assert_allclose(resampled_chi(sums, ["L0H0"], np.random.default_rng(3))[:, 0], expected, rtol=1e-12)


def test_oriented_pc2_separates_a_planted_split():
    """Two groups of columns share one strong mode (PC1) and differ by a second: PC2's AUC is 1, with the
    positive group on the + side whatever the SVD's sign."""
    rng = np.random.default_rng(1)
    n = 2000
    common, second = rng.normal(size=n), rng.normal(size=n)
    comps = [f"c{i}" for i in range(6)]
    cols = [common * 3 + (second if i < 2 else -0.5 * second) + 0.1 * rng.normal(size=n) for i in range(6)]
    z, _ = standardize(np.stack(cols, axis=1), "zscore", comps)
    loadings, scores, auc = oriented_pc2(z, comps, {"c0", "c1"})
    assert auc == 1.0 and loadings[:2].min() > loadings[2:].max()
    flipped, _, auc_ref = oriented_pc2(z, comps, {"c0", "c1"}, reference=-loadings)
    assert np.allclose(flipped, -loadings) and auc_ref == 0.0  # aligned with the reference, not with the split


def test_dataset_level_config_errors(tmp_path, tiny_checkpoint, corpus_dir):
    same_seed = compose_study(tmp_path, tiny_checkpoint, corpus_dir, *REPLICATION, "dataset_level.seed=0")
    with pytest.raises(ValueError, match="dataset_level.seed=0 equals the study's seed"):
        study.run(same_seed)
    one_context = compose_study(tmp_path, tiny_checkpoint, corpus_dir, *REPLICATION,
                                "perturbation.contexts_per_probe=1")
    with pytest.raises(ValueError, match="contexts_per_probe >= 2"):
        study.run(one_context)


def test_pc2_ends_row_counts_the_classes_at_each_end(replication_run):
    """The Fig. 3 row of the replication section gives, for each PC2 class, its shares among the lowest, all
    and highest tokens of PC2 oriented so that the induction heads load +: recomputed here from the analysis'
    own PCA and token classes (the tiny model has no induction head, so L1H0 is named one; its layers have two
    heads each, too few for a per-layer PC2, so the PCA over all heads is the one checked)."""
    cfg, run_dir = replication_run
    run = load_run(run_dir)
    roles = run.head_roles
    induction = pa.array([1.0 if c == "L1H0" else 0.0 for c in roles.column("component").to_pylist()])
    run = dataclasses.replace(run, head_roles=roles.set_column(roles.schema.get_field_index("induction"),
                                                               "induction", induction))
    analysis = analyze(run, cfg.analysis)
    row = next(r for r in analysis.replication if r["figure"].startswith("PC2 ends") and r["pca"] == "all")
    comps = list(analysis.pcas["all"].components)
    z = standardized_all(run, analysis)[analysis.rows][:, [analysis.components.index(c) for c in comps]]
    scores = oriented_pc2(z, comps, {"L1H0"})[1]
    shares = {r["class"]: r for r in extreme_class_shares(scores, analysis.classes.flags[analysis.rows],
                                                           analysis.classes.names, cfg.analysis.report.extreme_fraction)}
    expected = "; ".join(f"{c} {100 * shares[c]['low']:.0f}% / {100 * shares[c]['all']:.0f}% / "
                         f"{100 * shares[c]['high']:.0f}%" for c in cfg.analysis.replication.pc2_classes if c in shares)
    assert expected and row["ours"] == expected and row["status"] == "info"
