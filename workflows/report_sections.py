"""The sections of the HTML report (``workflows/report.py``), each an HTML string: header, replication,
validation checks, the head PCAs with the token classes at each end of their PCs (the paper's Fig. 3), the
non-head components apart, the response matrix, the sampler diagnostics beside the SGLD traces.
"""

from __future__ import annotations

import html
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from susc_core.analysis import Analysis, AnalysisConfig, ReportOptions
from susc_core.analysis.analyze import class_means, class_score_means, extreme_classes
from susc_core.analysis.non_head import NON_HEAD
from susc_core.analysis.pca import PCAResult
from susc_core.analysis.results import RunResults
from susc_core.analysis.validation import diagnostic_flags
from workflows import report_figures as figs

SECTIONS = (("validation", "validation"), ("pca", "head PCA"), ("non-head", "non-head components"),
            ("response", "response matrix"), ("diagnostics", "sampler diagnostics"), ("viewer", "token viewer"))


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits ("nan" when not finite), anything else escaped."""
    if isinstance(value, float):
        return "nan" if not np.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def html_table(rows: list[dict], flagged: list[bool] | None = None) -> str:
    """A plain HTML table of dict rows (keys of the first row as header)."""
    if not rows:
        return "<p>(no rows)</p>"
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td class='text'>{fmt(v)}</td>" if isinstance(v, str) else f"<td>{fmt(v)}</td>"
                        for v in row.values())
        body.append(f"<tr class='flag'>{cells}</tr>" if flagged and flagged[i] else f"<tr>{cells}</tr>")
    body = "".join(body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def header(run: RunResults, analysis: Analysis) -> str:
    """Title, sign convention, what was analysed, class counts, and links to the sections."""
    probes = sorted(set(run.tokens.column("probe").to_pylist()))
    counts = {name: int((analysis.classes.primary == name).sum())
              for name in dict.fromkeys(analysis.classes.primary)}
    links = " · ".join(f"<a href='#{anchor}'>{name}</a>" for anchor, name in SECTIONS)
    return (
        f"<h1>Susceptibility report: {html.escape(run.run_dir.name)}</h1><nav>{links}</nav>"
        "<p class='sign'>Sign convention (per-component standardised χ): <b>negative = "
        "expression</b> (the component raises the probability of the continuation), <b>positive ="
        " suppression</b>.</p>"
        f"<p>{run.tokens.num_rows} probe tokens in probes {html.escape(', '.join(probes))}; "
        f"components analysed: {html.escape(' '.join(analysis.components))}"
        + (f"; <b>left out (non-finite or constant χ̂): {html.escape(' '.join(analysis.dropped))}</b>"
           if analysis.dropped else "") + ".</p>"
        + "<p>Token classes (primary label): " + html.escape(", ".join(
            f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))) + "</p>")


def replication_section(analysis: Analysis) -> str:
    """The paper's figures beside ours (only with ``analysis.replication.enabled``)."""
    if not analysis.replication:
        return ""
    return ("<h2 id='replication'>Replication of the paper's structural finding</h2><p>Our figures beside "
            "the paper's (SCIENCE.md §5); flagged rows missed the acceptance rule of "
            "<code>analysis.replication</code>.</p>"
            + html_table(analysis.replication, [r["status"] == "flag" for r in analysis.replication]))


def checks_section(analysis: Analysis) -> str:
    rows = "".join(
        f"<tr><td class='text'>{html.escape(c.name)}</td>"
        f"<td class='text status-{c.status}'>{c.status}</td>"
        f"<td class='text'>{html.escape(c.summary)}"
        + (f"<details><summary>{len(c.details)} rows</summary>{html_table(c.details)}</details>"
           if c.details else "") + "</td></tr>"
        for c in analysis.checks)
    return ("<h2 id='validation'>Validation</h2><table><thead><tr><th>check</th><th>status</th>"
            f"<th>result</th></tr></thead><tbody>{rows}</tbody></table>")


def pca_sections(run: RunResults, analysis: Analysis, cfg: AnalysisConfig) -> str:
    """The head PCAs: variance explained, then per PCA its loadings (heads labelled with their measured role)
    beside the token scatter, the token classes at each end of its PCs, and the class means."""
    opts = cfg.report
    if not analysis.pcas:
        return "<h2 id='pca'>PCA of the heads</h2><p>The run analyses no attention head.</p>"
    roles = run.roles()
    parts = ["<h2 id='pca'>PCA of the standardised tokens × heads matrix</h2>",
             f"<p>{len(analysis.rows)} tokens, standardisation: {html.escape(cfg.standardize)}; attention heads "
             "only, per layer and over all layers (other components: <a href='#non-head'>apart</a>). PCs are "
             "signed so that their loadings sum to ≥ 0: a positive score is a token the loading-weighted "
             "components suppress, a negative one a token they express. "
             + ("Heads are labelled with their measured role (head_roles.parquet)." if roles else
                "No head roles were measured for this run (no <code>role</code> column), so heads are unlabelled.")
             + "</p>",
             figs.fragment(figs.variance_figure(analysis.pcas, opts.n_pcs_shown), "fig-variance"),
             variance_table(analysis.pcas, opts.n_pcs_shown)]
    shown = scatter_sample(len(analysis.rows), opts.max_scatter_points, cfg.seed)
    rows = analysis.rows[shown]
    hover, labels = figs.hover_texts(run.tokens, rows), analysis.classes.primary[rows]
    for key, res in analysis.pcas.items():
        pair = [f"<div><h3>{html.escape(key)}: loadings (mode–component couplings)</h3>"
                + figs.fragment(figs.loadings_figure(res, opts.n_pcs_shown, roles), f"fig-loadings-{key}")
                + "</div>"]
        if res.scores.shape[1] >= 2:
            pair.append(f"<div><h3>{html.escape(key)}: token scores by class ({len(shown)} of {len(analysis.rows)} "
                        "tokens)</h3>" + figs.fragment(figs.scatter_figure(res.scores[shown], labels, hover),
                                                       f"fig-scatter-{key}") + "</div>")
        parts += [f"<div class='pair'>{''.join(pair)}</div>", class_bars(analysis, key, opts),
                  f"<details><summary>{html.escape(key)}: mean token score per class (mode–data coupling; a "
                  "token counts in every class it has)</summary>"
                  + html_table(class_score_means(analysis, key, opts.n_pcs_shown)) + "</details>"]
    return "\n".join(parts)


def scatter_sample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of the tokens drawn in the PCA scatters: all n, or ``max_points`` of them (seeded), so
    that a page of 20,000 tokens stays responsive."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def class_bars(analysis: Analysis, key: str, opts: ReportOptions) -> str:
    """The paper's Fig. 3 for PCA ``key``: token classes among each PC's extreme tokens, as bars."""
    shares = extreme_classes(analysis, key, opts.n_pcs_shown, opts.extreme_fraction)
    return (f"<h3>{html.escape(key)}: token classes at each end of a PC (the paper's Fig. 3)</h3>"
            f"<p>Share of the {100 * opts.extreme_fraction:g}% lowest- and highest-scoring tokens that have each "
            "class, beside its share among all tokens (a token counts in every class it has).</p>"
            + figs.fragment(figs.extreme_classes_figure(shares, opts.extreme_fraction), f"fig-classes-{key}"))


def variance_table(pcas: Mapping[str, PCAResult], n_pcs: int) -> str:
    """% variance explained by PC1..PCn of each PCA, one row per PCA."""
    return html_table([{"pca": key, **{f"PC{k + 1} %": 100 * float(v) for k, v in
                                       enumerate(res.variance_explained[:n_pcs])}} for key, res in pcas.items()])


def non_head_section(analysis: Analysis, z_all: np.ndarray, cfg: AnalysisConfig) -> str:
    """Embeddings, MLPs, whole blocks and the unembedding, apart from the head PCAs (``non_head.py``)."""
    nh, n_pcs = analysis.non_head, cfg.report.n_pcs_shown
    title = "<h2 id='non-head'>Non-head components</h2>"
    if not nh.components:
        return title + "<p>The run analyses attention heads only.</p>"
    values = z_all[analysis.rows][:, [analysis.components.index(c) for c in nh.components]]
    parts = [title, f"<p>{html.escape(' '.join(nh.components))}: analysed apart from the head PCAs (a whole "
             "block or an embedding moves many heads' inputs at once). Pearson r of each one's standardised χ "
             "with the token scores on the heads' PCs (all heads; r near ±1: it responds like that mode):</p>",
             html_table(nh.head_mode_r),
             "<details><summary>mean standardised χ per token class (a token counts in every class it has)"
             "</summary>" + html_table(class_means(analysis.classes, analysis.rows, values, list(nh.components)))
             + "</details>"]
    if nh.pca is not None:
        parts += ["<h3>PCA of the non-head components alone</h3>", variance_table({NON_HEAD: nh.pca}, n_pcs),
                  figs.fragment(figs.loadings_figure(nh.pca, n_pcs, {}), "fig-loadings-non-head")]
    return "\n".join(parts)


def response_section(run: RunResults, opts: ReportOptions) -> str:
    """The probes × components heatmap of one response_matrix column."""
    return ("<h2 id='response'>Response matrix</h2>"
            f"<p>Probes × components, column <code>{html.escape(opts.heatmap_value)}</code>.</p>"
            + figs.fragment(figs.heatmap_figure(run.response, opts.heatmap_value, opts.diverging_colorscale),
                            "fig-heatmap"))


def diagnostics_section(run: RunResults, cfg: AnalysisConfig) -> str:
    """Per-component R-hat, ESS, LLC and flagged chains beside the SGLD traces; every (component, chain) row."""
    rules = cfg.validation
    flagged = diagnostic_flags(run.diagnostics, rules)["any"]
    per_component = (run.diagnostics.append_column("flagged chains", pa.array(flagged.astype(int)))
                     .group_by("component", use_threads=False)
                     .aggregate([("chain", "count"), ("flagged chains", "sum"), ("llc", "mean"),
                                 ("rhat", "max"), ("ess", "min")]))
    names = {"component": "component", "chain_count": "chains", "flagged chains_sum": "flagged chains",
             "llc_mean": "llc (mean)", "rhat_max": "max rhat", "ess_min": "min ess"}
    summary_rows = [{new: row[old] for old, new in names.items()} for row in per_component.to_pylist()]
    shared = run.manifest.get("config", {}).get("sampler", {}).get("share_minibatches", False)
    shared_note = ("<p class='warn'><b>share_minibatches is on</b>: every chain read the same minibatch sequence, "
                   "so the chains of a component are not independent; standard errors, R-hat and ESS are "
                   "optimistic (README, \"Independent chains\").</p>") if shared else ""
    table = html_table(summary_rows, [r["flagged chains"] > 0 for r in summary_rows])
    return ("<h2 id='diagnostics'>Sampler diagnostics</h2>" + shared_note + "<p>Flagged (highlighted): diverged, "
            "unstable at the curvature pre-flight (<code>stability</code> = ε(nβλ + γ) above the bound), a g trace "
            "still drifting (<code>drift_z</code>), an LLC far from its sibling chains' (<code>llc_outlier</code>); "
            "these chains are <code>excluded</code> from every estimate or stop the study, per "
            f"<code>sampler.divergence_policy</code>. Also flagged: R-hat &gt; {rules.max_rhat} or ESS &lt; "
            f"{rules.min_ess}. <code>llc</code> is the "
            "weight-refined LLC of a head (the ordinary LLC for <code>full</code>).</p>"
            + f"<div class='pair'><div>{table}</div><div>{traces_panel(run, summary_rows, cfg.report)}</div></div>"
            + f"<details><summary>every (component, chain): {len(flagged)} rows</summary>"
            + html_table(run.diagnostics.to_pylist(), list(flagged)) + "</details>")


def traces_panel(run: RunResults, summary_rows: list[dict], opts: ReportOptions) -> str:
    """The SGLD traces figure (g per draw per chain, a component at a time, in the summary table's order),
    each component labelled with its R-hat and ESS; a note instead when the run folder recorded no trace."""
    traces = run.g_traces()
    if not traces:
        return ("<p id='no-traces'><b>SGLD traces are not recorded in this run folder</b> (no "
                "<code>g_trace</code> column in chain_sums.parquet: a run written before issue 17, or no "
                "chain_sums.parquet).</p>")
    labels = {r["component"]: f"{r['component']}: max R-hat {fmt(r['max rhat'])}, min ESS {fmt(r['min ess'])}"
              for r in summary_rows}
    ordered = {c: traces[c] for c in [*labels, *traces] if c in traces}
    return ("<h3>SGLD traces: g = L<sub>n</sub>(draw) − L<sub>n</sub>(w*) per chain</h3>"
            + figs.fragment(figs.trace_figure(ordered, labels, opts.max_trace_draws), "fig-traces"))
