"""The paper's structural finding beside ours (SCIENCE.md §5; issue 15): one row per figure.

Figures: PC1 variance and sign uniformity per layer; PC2 AUC of the induction heads' loadings against
the other heads' per PCA, with a bootstrap interval that resamples chains (each component's chains,
with replacement, χ̂ recomputed from their sums) and tokens; PC2 class means (induction-pattern vs
word-part tokens) and those classes' shares among PC2's extreme tokens (the paper's Fig. 3); PC3
loadings and delimiter class means; mean r against zero-ablation; slope and r of the aggregated
per-token vs dataset-level χ; R-hat and ESS. Each row says whether the acceptance
rule of ``ReplicationConfig`` holds ("pass" / "flag"), "info" where there is no rule.

PC signs: PCA signs are arbitrary, so PC2 is oriented here so that the induction heads' mean loading
is >= the other heads' (AUC >= 0.5 on the data); each bootstrap replicate's PC2 is aligned with the
data's by the sign of their loadings' dot product, so a replicate whose PC2 is another mode shows up as
a low AUC instead of being flipped into agreement.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa

from susc_core.analysis.config import AnalysisConfig
from susc_core.analysis.pca import pca
from susc_core.analysis.standardize import standardize
from susc_core.analysis.token_classes import extreme_class_shares
from susc_core.analysis.validation import Check, diagnostic_flags, rank_auc
from susc_core.stats.estimators import chi_from_sums

FULL = "full"


def chain_sums_by_component(table: pa.Table) -> dict[str, dict[str, np.ndarray]]:
    """chain_sums.parquet -> component -> {"count" [k], "sum_g" [k], "sum_ga" [k, T], "sum_a" [k, T]}
    over the component's non-diverged chains, in chain order."""
    rows = [r for r in table.to_pylist() if not r["diverged"]]
    out: dict[str, dict[str, list]] = {}
    for r in sorted(rows, key=lambda r: (r["component"], r["chain"])):
        d = out.setdefault(r["component"], {"count": [], "sum_g": [], "sum_ga": [], "sum_a": []})
        for key in d:
            d[key].append(r[key])
    return {c: {k: np.asarray(v, np.float64) for k, v in d.items()} for c, d in out.items()}


def resampled_chi(sums: Mapping[str, Mapping[str, np.ndarray]], components: Sequence[str],
                  generator: np.random.Generator) -> np.ndarray:
    """χ̂ [T, n_components] from a resample (with replacement) of each component's chains and of the
    centring run's (``full`` when present, else each component's own: the restricted estimator)."""
    def pooled(comp: str) -> dict[str, np.ndarray]:
        d = sums[comp]
        pick = generator.integers(0, len(d["count"]), len(d["count"]))
        return {k: v[pick].sum(axis=0) for k, v in d.items()}

    full = pooled(FULL) if FULL in sums else None
    columns = []
    for comp in components:
        c = pooled(comp)
        ref = full if full is not None else c
        columns.append(chi_from_sums(c["sum_ga"], c["sum_g"], c["count"], ref["sum_a"], ref["count"]))
    return np.stack(columns, axis=1)


def oriented_pc2(z: np.ndarray, components: Sequence[str], positive: set[str],
                 reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """PC2 of the standardised ``z`` [n_tokens, n_components]: (loadings [n_components], scores [n_tokens],
    AUC of the ``positive`` components' loadings against the others'). Oriented so that the positive set
    loads higher on average, or, given ``reference`` loadings, so that the dot product with them is >= 0."""
    res = pca(z, components)
    loadings, scores = res.loadings[1], res.scores[:, 1]
    is_pos = np.array([c in positive for c in components])
    if reference is not None:
        flip = float(loadings @ reference) < 0
    else:
        flip = loadings[is_pos].mean() < loadings[~is_pos].mean()
    if flip:
        loadings, scores = -loadings, -scores
    return loadings, scores, rank_auc(loadings[is_pos], loadings[~is_pos])


def bootstrap_auc(sums: Mapping[str, Mapping[str, np.ndarray]], rows: np.ndarray, components: Sequence[str],
                  positive: set[str], reference: np.ndarray, method: str, n_bootstrap: int,
                  generator: np.random.Generator) -> np.ndarray:
    """[n_bootstrap] PC2 AUCs, each on chains resampled per component and tokens resampled from ``rows``
    (indices into the chain sums' token axis); PC2 aligned with ``reference`` loadings."""
    out = np.empty(n_bootstrap)
    for b in range(n_bootstrap):
        chi = resampled_chi(sums, components, generator)
        picked = chi[generator.choice(rows, len(rows), replace=True)]
        z, _ = standardize(picked, method, components)
        out[b] = oriented_pc2(z, components, positive, reference)[2]
    return out


def _row(figure: str, pca_key: str, ours, paper, status: str, interval: str = "") -> dict:
    return {"figure": figure, "pca": pca_key, "ours": ours, "interval": interval, "paper": paper, "status": status}


def replication_rows(z: np.ndarray, names: Sequence[str], pcas: Mapping, rows: np.ndarray, classes, run,
                     checks: Sequence[Check], cfg: AnalysisConfig) -> list[dict]:
    """Every replication figure as a row {figure, pca, ours, interval, paper, status}.

    z: [n_selected, n_components] the analysis' standardised matrix, its columns called ``names``;
    rows: the token rows it holds; classes: the ``TokenClasses`` of every token row; run: ``RunResults``
    (head_roles, chain_sums, diagnostics); checks: the analysis' validation checks (ablation, slope)."""
    rep, rules = cfg.replication, cfg.validation
    roles = dict(zip(run.head_roles.column("component").to_pylist(), run.head_roles.column("induction").to_pylist()))
    prev = dict(zip(run.head_roles.column("component").to_pylist(),
                    run.head_roles.column("previous_token").to_pylist()))
    induction = {h for h, s in roles.items() if s >= rules.induction_head_threshold}
    previous = {h for h, s in prev.items() if s >= rules.induction_head_threshold} - induction
    sets = (("induction heads", induction), ("previous-token heads", previous),
            ("induction circuit (induction + previous-token heads)", induction | previous))
    sums = chain_sums_by_component(run.chain_sums)
    generator = np.random.default_rng(cfg.seed)
    lo_q, hi_q = (1 - rep.interval) / 2, 1 - (1 - rep.interval) / 2
    out = []
    for key, res in pcas.items():
        one_sign = bool((res.loadings[0] > 0).all() or (res.loadings[0] < 0).all())
        paper = rep.paper_pc1_variance.get(key)
        out.append(_row("PC1 variance explained, one sign", key,
                        f"{100 * res.variance_explained[0]:.2f}%, {'one sign' if one_sign else 'mixed signs'}",
                        "" if paper is None else f"~{100 * paper:.0f}%, one sign", "pass" if one_sign else "flag"))
    for key, res in pcas.items():
        heads = [c for c in res.components if c in roles]
        comps = list(res.components)
        if len(comps) < 3 or not heads:
            continue
        done: list[set] = []
        for label, positive in sets:
            pos = {c for c in comps if c in positive}
            if not pos or len(pos) == len(comps) or pos in done:
                continue
            done.append(pos)
            zk = z[:, [names.index(c) for c in comps]]
            loadings, scores, auc = oriented_pc2(zk, comps, pos)
            boot = bootstrap_auc(sums, rows, comps, pos, loadings, cfg.standardize, rep.n_bootstrap, generator)
            lo, hi = np.quantile(boot, [lo_q, hi_q])
            ok = auc >= rep.min_auc and lo >= rep.min_auc_lower
            status = ("pass" if ok else "flag") if label == "induction heads" else "info"
            out.append(_row(f"PC2 AUC, {label} {sorted(pos)} vs the rest", key, round(auc, 4),
                            "separates (AUC 1)", status, f"[{lo:.3f}, {hi:.3f}] ({100 * rep.interval:.0f}%, "
                            f"{rep.n_bootstrap} resamples of chains and tokens)"))
            if label != "induction heads":
                continue
            flags = classes.flags[rows]
            means = {c: float(scores[flags[:, classes.names.index(c)]].mean())
                     for c in rep.pc2_classes if flags[:, classes.names.index(c)].any()}
            a, b = rep.pc2_classes
            opposite = a in means and b in means and np.sign(means[a]) != np.sign(means[b])
            out.append(_row("PC2 mean token score by class (PC2 oriented: induction heads load +)", key,
                            ", ".join(f"{c} {v:+.3f}" for c, v in means.items()),
                            f"{a} and {b} on opposite sides", "pass" if opposite else "flag"))
            ends = {r["class"]: r for r in extreme_class_shares(scores, flags, classes.names,
                                                                cfg.report.extreme_fraction)}
            out.append(_row(f"PC2 ends (Fig. 3): share of each class among the {100 * cfg.report.extreme_fraction:g}% "
                            "lowest-scoring tokens (expressed by the induction heads) / all tokens / the highest",
                            key, "; ".join(f"{c} {100 * ends[c]['low']:.0f}% / {100 * ends[c]['all']:.0f}% / "
                                           f"{100 * ends[c]['high']:.0f}%" for c in rep.pc2_classes if c in ends),
                            f"{a} at one end, {b} at the other", "info"))
            if len(res.loadings) >= 3:
                pc3 = res.scores[:, 2]
                delim = {c: float(pc3[flags[:, classes.names.index(c)]].mean()) for c in rep.pc3_classes
                         if flags[:, classes.names.index(c)].any()}
                out.append(_row("PC3 loadings; mean PC3 score of delimiter tokens", key,
                                " ".join(f"{c} {v:+.2f}" for c, v in zip(comps, res.loadings[2])) + " | "
                                + ", ".join(f"{c} {v:+.3f}" for c, v in delim.items()),
                                "PC3: delimiters (bracket-matching heads)", "info"))
    by_name = {c.name: c for c in checks}
    abl = by_name.get("susceptibility vs zero-ablation")
    if abl is not None and abl.details:
        r = float(np.nanmean([d["r"] for d in abl.details]))
        out.append(_row("mean r, χ̂ vs zero-ablation loss delta", "heads", round(r, 4),
                        f"r ≈ {rep.paper_ablation_r}", "pass" if abs(r) < rep.max_abs_ablation_r else "flag"))
    slope = by_name.get("aggregated per-token vs dataset-level χ")
    if slope is not None and slope.status != "skipped":
        out.append(_row("aggregated per-token vs dataset-level χ", "probes × components", slope.summary,
                        f"slope {rep.paper_slope}, r {rep.paper_slope_r}", slope.status))
    rhat = run.diagnostics.column("rhat").to_numpy(zero_copy_only=False)
    ess = run.diagnostics.column("ess").to_numpy(zero_copy_only=False)
    share = float(np.mean(rhat <= rules.max_rhat))
    flags = diagnostic_flags(run.diagnostics, rules)
    out.append(_row("R-hat ≤ max_rhat share; R-hat range; ESS median (min)", "(component, chain)",
                    f"{100 * share:.0f}% ≤ {rules.max_rhat}; R-hat {np.nanmin(rhat):.3f}–{np.nanmax(rhat):.3f}; "
                    f"ESS {np.nanmedian(ess):.0f} ({np.nanmin(ess):.0f}); {int(flags['diverged'].sum())} diverged",
                    "4 chains (no R-hat reported)", "pass" if share >= rep.min_rhat_share else "flag"))
    return out
