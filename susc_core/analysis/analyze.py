"""The whole analysis of one run: select tokens, standardise, PCA per layer, token classes, checks."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from susc_core.analysis.config import AnalysisConfig
from susc_core.analysis.non_head import NonHeadAnalysis, non_head_analysis
from susc_core.analysis.pca import PCAResult, pca_by_layer
from susc_core.analysis.standardize import Standardization, finite_components, standardize
from susc_core.analysis.token_classes import TokenClasses, classify_table, extreme_class_shares
from susc_core.analysis import validation
from susc_core.analysis.replication import replication_rows
from susc_core.analysis.results import RunResults


class Analysis(NamedTuple):
    components: tuple[str, ...]  # analysed components (finite, non-constant columns)
    dropped: tuple[str, ...]  # components left out: NaN/inf or constant χ̂
    rows: np.ndarray  # [n_selected] row indices of run.tokens that entered the PCA
    standardization: Standardization  # fitted on the selected rows, [n_components] each
    pcas: dict[str, PCAResult]  # heads only: "L0", "L1", ..., "all" (scores for the selected rows)
    non_head: NonHeadAnalysis  # embeddings, MLPs, whole blocks, unembedding: apart from the head PCAs
    classes: TokenClasses  # for every row of run.tokens
    checks: list[validation.Check]
    replication: list[dict]  # the paper's figures beside ours (``replication.py``); empty unless enabled


def sample_rows(probes: np.ndarray, max_per_probe: int, seed: int) -> np.ndarray:
    """Row indices [n_selected] (sorted) keeping at most ``max_per_probe`` rows of each probe
    (0 keeps all), drawn without replacement with a seeded generator; probes: [n_rows] str."""
    if max_per_probe < 0:
        raise ValueError(f"max_tokens_per_probe must be >= 0 (0 = all); got {max_per_probe}")
    if max_per_probe == 0:
        return np.arange(len(probes))
    rng = np.random.default_rng(seed)
    picked = []
    for probe in sorted(set(probes)):
        rows = np.flatnonzero(probes == probe)
        picked.append(rng.choice(rows, max_per_probe, replace=False) if len(rows) > max_per_probe
                      else rows)
    return np.sort(np.concatenate(picked))


def standardized_all(run: RunResults, analysis: Analysis) -> np.ndarray:
    """Standardised χ of EVERY token row [n_rows, n_components] with the fitted statistics."""
    index = [run.components.index(c) for c in analysis.components]
    st = analysis.standardization
    return (run.chi_matrix()[:, index] - st.center) / st.scale


def class_means(classes: TokenClasses, rows: np.ndarray, values: np.ndarray, names: list[str]) -> list[dict]:
    """Per token class (every class a token has, not only its primary one) among the token ``rows``
    [n]: the token count and the mean of each column of ``values`` [n, len(names)], keyed by ``names``."""
    flags = classes.flags[rows]  # [n, n_classes]
    return [{"class": name, "tokens": int(flags[:, j].sum()),
             **{col: float(values[flags[:, j], i].mean()) for i, col in enumerate(names)}}
            for j, name in enumerate(classes.names) if flags[:, j].any()]


def class_score_means(analysis: Analysis, key: str, n_pcs: int) -> list[dict]:
    """The data side of PCA ``key``: per token class, the token count and the mean score on PC1..PCn
    of the PCA's tokens (``class_means``)."""
    scores = analysis.pcas[key].scores
    k = min(n_pcs, scores.shape[1])
    return class_means(analysis.classes, analysis.rows, scores[:, :k], [f"PC{i + 1}" for i in range(k)])


def extreme_classes(analysis: Analysis, key: str, n_pcs: int, fraction: float) -> dict[str, list[dict]]:
    """``extreme_class_shares`` of PC1..PCn of PCA ``key`` over its tokens: {"PC1": rows, ...}."""
    scores = analysis.pcas[key].scores
    flags = analysis.classes.flags[analysis.rows]
    return {f"PC{k + 1}": extreme_class_shares(scores[:, k], flags, analysis.classes.names, fraction)
            for k in range(min(n_pcs, scores.shape[1]))}


def analyze(run: RunResults, cfg: AnalysisConfig) -> Analysis:
    """Run every analysis step of issue 6 on a loaded run (pure: writes nothing)."""
    chi = run.chi_matrix()
    kept, dropped = finite_components(chi, run.components)
    if not kept:
        raise ValueError(f"no component has finite, non-constant χ̂ (all of {dropped} left out); "
                         "check the diagnostics for divergent chains")
    probes = np.asarray(run.tokens.column("probe").to_pylist(), dtype=object)
    rows = sample_rows(probes, cfg.max_tokens_per_probe, cfg.seed)
    columns = [run.components.index(c) for c in kept]
    z, st = standardize(chi[np.ix_(rows, columns)], cfg.standardize, kept)
    pcas = pca_by_layer(z, kept, run.layers)
    non_head = non_head_analysis(z, kept, run.layers, pcas, cfg.report.n_pcs_shown)
    rules = cfg.validation
    checks = [
        validation.uniform_mode(pcas, rules),
        validation.pc2_separation(pcas, run.head_roles, rules),
        validation.ablation_correlation(run.tokens, run.ablation, kept, rules),
        validation.aggregation_slope(run.tokens, run.response, kept, run.delta_h, rules),
        validation.sampler_diagnostics(run.diagnostics, rules),
    ]
    checks = validation.mark_unreliable(checks, run.diagnostics, rules)
    classes = classify_table(run.tokens, cfg.token_classes)
    replication = []
    if cfg.replication.enabled:
        missing = [f for f, t in (("chain_sums.parquet", run.chain_sums), ("head_roles.parquet", run.head_roles))
                   if t is None]
        if missing:
            raise ValueError(f"analysis.replication.enabled needs {missing} in {run.run_dir} (a study of the bundled "
                             "model writes both); set analysis.replication.enabled=false for this run")
        replication = replication_rows(z, kept, pcas, rows, classes, run, checks, cfg)
    return Analysis(tuple(kept), tuple(dropped), rows, st, pcas, non_head, classes, checks, replication)
