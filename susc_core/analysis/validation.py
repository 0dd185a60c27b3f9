"""Checks run on every study and shown in the report (SCIENCE.md §2, §5; issue 6 item 3).

Each check returns a ``Check``: status "pass", "flag" (a threshold of ``ValidationRules`` missed:
worth a look, never fatal) or "skipped" (an input is absent; the summary says which), a one-line
summary with the numbers, and detail rows for a table. When the sampler diagnostics find chains that
did not sample the local posterior (diverged, unstable at the pre-flight, drifting, an outlying LLC),
every "pass" becomes "unreliable" (``mark_unreliable``): the numbers it passed on are suspect.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from susc_core.analysis.config import ValidationRules
from susc_core.analysis.pca import PCAResult

KEYS = ("probe", "context_id", "position")


class Check(NamedTuple):
    name: str
    status: str  # "pass" | "flag" | "skipped" | "unreliable"
    summary: str
    details: list[dict]  # rows of a detail table (may be empty)


def _skip(name: str, reason: str) -> Check:
    return Check(name, "skipped", reason, [])


def pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two [n] arrays; NaN when either is constant or n < 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx**2).sum() * (dy**2).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def rank_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive value > a negative value), ties counted half: [n_pos], [n_neg] -> float."""
    diff = np.asarray(positive, dtype=np.float64)[:, None] - np.asarray(negative, dtype=np.float64)[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def ablation_correlation(tokens: pa.Table, ablation: pa.Table | None, heads: Sequence[str],
                         rules: ValidationRules) -> Check:
    """Per-head Pearson r between per-token χ̂ and the zero-ablation loss delta (nats) of the
    same token, joined on (probe, context_id, position). The paper finds r ≈ 0."""
    name = "susceptibility vs zero-ablation"
    if ablation is None:
        return _skip(name, "the run has no ablation.parquet")
    shared = [h for h in heads if h in ablation.column_names]
    if not shared:
        return _skip(name, "ablation.parquet has no column for any analysed head")
    left = tokens.select([*KEYS, *shared])
    right = ablation.select([*KEYS, *shared]).rename_columns([*KEYS, *[f"{h}__abl" for h in shared]])
    joined = left.join(right, keys=list(KEYS), join_type="inner")
    if joined.num_rows < 2:
        return _skip(name, f"only {joined.num_rows} tokens are in both tables")
    rows = [{"component": h, "r": pearson_r(joined.column(h).to_numpy(),
                                            joined.column(f"{h}__abl").to_numpy())} for h in shared]
    rs = np.array([row["r"] for row in rows])
    worst = float(np.nanmax(np.abs(rs))) if np.isfinite(rs).any() else float("nan")
    status = "pass" if worst <= rules.ablation_max_abs_r else "flag"
    return Check(name, status, f"{joined.num_rows} tokens, {len(shared)} heads: mean r = "
                 f"{np.nanmean(rs):+.3f}, max |r| = {worst:.3f} (paper: r ≈ 0; flag above "
                 f"{rules.ablation_max_abs_r})", rows)


def aggregation_slope(tokens: pa.Table, response: pa.Table, components: Sequence[str],
                      delta_h: float | None, rules: ValidationRules) -> Check:
    """Least-squares slope and Pearson r of the aggregated per-token χ (mean of χ̂_xy over a
    probe's tokens) against the dataset-level δh-mixture estimate, over (probe, component) pairs.
    The mixture estimates δh·χ, so the slope should be ≈ 1/δh (paper: r 0.958, slope 9.794). When the
    token table has a ``half`` column, only half-a tokens are aggregated: the study computes the
    mixture estimate on the disjoint half-b contexts, so the two estimates share no data."""
    name = "aggregated per-token vs dataset-level χ"
    if delta_h is None or delta_h <= 0:
        return _skip(name, "the manifest has no positive perturbation.delta_h")
    if "chi_mixture" not in response.column_names:
        return _skip(name, "response_matrix.parquet has no chi_mixture column")
    if "half" in tokens.column_names:  # the mixture estimate used half b: aggregate the disjoint half a
        tokens = tokens.filter(pc.equal(tokens.column("half"), "a"))
    grouped = tokens.group_by("probe").aggregate([(c, "mean") for c in components])
    aggregated = {(p, c): v for c in components
                  for p, v in zip(grouped.column("probe").to_pylist(),
                                  grouped.column(f"{c}_mean").to_pylist())}
    x, y, rows = [], [], []
    for p, c, m in zip(*(response.column(k).to_pylist() for k in ("probe", "component", "chi_mixture"))):
        if (p, c) in aggregated and m is not None and np.isfinite(m):
            x.append(m), y.append(aggregated[(p, c)])
            rows.append({"probe": p, "component": c, "chi_mixture": m, "aggregated": aggregated[(p, c)]})
    if len(x) < 3:
        return _skip(name, f"only {len(x)} (probe, component) pairs have a finite chi_mixture")
    x, y = np.array(x), np.array(y)
    if np.ptp(x) == 0:
        return _skip(name, f"chi_mixture is the same ({x[0]:.4g}) for every (probe, component) pair")
    slope = float(np.polyfit(x, y, 1)[0])
    r = pearson_r(x, y)
    ok = abs(slope * delta_h - 1) <= rules.slope_rel_tol and r >= rules.slope_min_r
    return Check(name, "pass" if ok else "flag",
                 f"{len(x)} pairs: slope = {slope:.3f} (1/δh = {1 / delta_h:.3f}), r = {r:.3f} "
                 f"(pass: |slope·δh − 1| ≤ {rules.slope_rel_tol}, r ≥ {rules.slope_min_r})", rows)


def uniform_mode(pcas: Mapping[str, PCAResult], rules: ValidationRules) -> Check:
    """Per PCA: PC1's variance explained and whether all its loadings share one sign (the paper's
    "uniform mode": ~95% in layer 0, ~99% in layer 1, all heads one sign)."""
    if not pcas:
        return _skip("PC1 uniform mode", "no PCA of heads (the run analyses no attention head)")
    rows = [{"pca": key, "pc1_variance": float(res.variance_explained[0]),
             "one_sign": bool((res.loadings[0] > 0).all() or (res.loadings[0] < 0).all())}
            for key, res in pcas.items()]
    ok = all(r["one_sign"] and r["pc1_variance"] >= rules.uniform_mode_min_variance for r in rows)
    text = ", ".join(f"{r['pca']}: {100 * r['pc1_variance']:.1f}%"
                     f"{'' if r['one_sign'] else ' (mixed signs)'}" for r in rows)
    return Check("PC1 uniform mode", "pass" if ok else "flag",
                 f"PC1 variance explained {text} (pass: one sign and ≥ "
                 f"{100 * rules.uniform_mode_min_variance:.0f}%)", rows)


def pc2_separation(pcas: Mapping[str, PCAResult], head_roles: pa.Table | None,
                   rules: ValidationRules) -> Check:
    """Whether PC2's loadings separate the induction heads (head-role induction score >=
    threshold) from the other heads, per PCA that holds both kinds: rank AUC of induction vs
    other loadings, max(AUC, 1 − AUC) = 1 for a clean split."""
    name = "PC2 separates induction heads"
    if head_roles is None:
        return _skip(name, "the run has no head_roles.parquet")
    scores = dict(zip(head_roles.column("component").to_pylist(),
                      head_roles.column("induction").to_pylist()))
    induction = {h for h, s in scores.items() if s >= rules.induction_head_threshold}
    if not induction:
        return _skip(name, f"no head has induction score ≥ {rules.induction_head_threshold} "
                     f"(max {max(scores.values(), default=float('nan')):.3f})")
    rows = []
    for key, res in pcas.items():
        is_ind = np.array([c in induction for c in res.components])
        heads = np.array([c in scores for c in res.components])
        if len(res.loadings) < 2 or not is_ind.any() or not (heads & ~is_ind).any():
            continue
        auc = rank_auc(res.loadings[1][is_ind], res.loadings[1][heads & ~is_ind])
        rows.append({"pca": key, "induction_heads": " ".join(sorted(c for c in res.components
                                                                      if c in induction)),
                     "auc": auc, "separates": max(auc, 1 - auc) >= rules.separation_min_auc})
    if not rows:
        return _skip(name, "no PCA holds both induction heads and other heads")
    ok = any(r["separates"] for r in rows)
    text = ", ".join(f"{r['pca']}: AUC {max(r['auc'], 1 - r['auc']):.2f}" for r in rows)
    return Check(name, "pass" if ok else "flag", f"induction heads {sorted(induction)}; {text} "
                 f"(pass: ≥ {rules.separation_min_auc} in some PCA)", rows)


POSTERIOR_FLAGS = ("diverged", "unstable", "nonstationary", "llc_outlier")  # not sampling the local posterior


def diagnostic_flags(diagnostics: pa.Table, rules: ValidationRules) -> dict[str, np.ndarray]:
    """Per (component, chain) row of diagnostics.parquet: [n_rows] bool arrays "diverged", "unstable",
    "nonstationary", "llc_outlier" (``POSTERIOR_FLAGS``; False where a run predates a column), "rhat" (above
    max_rhat; NaN, i.e. fewer than two kept chains or 4 draws, is not flagged), "ess" (below min_ess or NaN),
    "posterior" (any of ``POSTERIOR_FLAGS``) and "any"."""
    rhat = diagnostics.column("rhat").to_numpy(zero_copy_only=False)
    ess = diagnostics.column("ess").to_numpy(zero_copy_only=False)
    flags = {name: (diagnostics.column(name).to_numpy(zero_copy_only=False).astype(bool)
                    if name in diagnostics.column_names else np.zeros(len(rhat), dtype=bool))
             for name in POSTERIOR_FLAGS}
    flags |= {"rhat": rhat > rules.max_rhat, "ess": ~(ess >= rules.min_ess)}
    posterior = np.any([flags[name] for name in POSTERIOR_FLAGS], axis=0)
    return flags | {"posterior": posterior, "any": posterior | flags["rhat"] | flags["ess"]}


def sampler_diagnostics(diagnostics: pa.Table, rules: ValidationRules) -> Check:
    """Flag every (component, chain) with R-hat above, ESS below the thresholds, or a posterior flag."""
    flags = diagnostic_flags(diagnostics, rules)
    bad = flags["any"]
    rows = [r for r, b in zip(diagnostics.to_pylist(), bad) if b]
    summary = (f"{int(bad.sum())} of {len(bad)} (component, chain) flagged: "
               + ", ".join(f"{int(flags[name].sum())} {name}" for name in POSTERIOR_FLAGS)
               + f", {int(flags['rhat'].sum())} with R-hat > {rules.max_rhat}, {int(flags['ess'].sum())} with ESS < "
               f"{rules.min_ess} or undefined; R-hat undefined (fewer than two kept chains or 4 draws) for "
               f"{int(np.isnan(diagnostics.column('rhat').to_numpy(zero_copy_only=False)).sum())}")
    return Check("sampler diagnostics", "flag" if bad.any() else "pass", summary, rows)


def mark_unreliable(checks: Sequence[Check], diagnostics: pa.Table, rules: ValidationRules) -> list[Check]:
    """Every "pass" becomes "unreliable" when some chain did not sample the local posterior (``POSTERIOR_FLAGS``)."""
    flags = diagnostic_flags(diagnostics, rules)
    if not flags["posterior"].any():
        return list(checks)
    why = (f"unreliable: {int(flags['posterior'].sum())} (component, chain) did not sample the local posterior "
           "(see sampler diagnostics); ")
    return [c._replace(status="unreliable", summary=why + c.summary) if c.status == "pass" else c for c in checks]
