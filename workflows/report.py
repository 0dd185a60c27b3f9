"""The self-contained HTML report of a study run (issue 6), plus ``analysis.json`` / ``analysis.md``.

    python -m workflows.report <run_dir> [validation.max_rhat=1.05 report.n_pcs_shown=4 ...]

Overrides are dotted keys of ``AnalysisConfig`` on top of ``conf/analysis/default.yaml``. The study
app calls ``write_report(run_dir, cfg.analysis)`` at its end. The page embeds plotly.js and all
data inline: it opens offline.
"""

from __future__ import annotations

import argparse
import html
import json
import re
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig, OmegaConf
from plotly.offline import get_plotlyjs

from susc_core.analysis import Analysis, AnalysisConfig, analyze
from susc_core.analysis.analyze import class_score_means, standardized_all
from susc_core.analysis.validation import diagnostic_flags
from susc_core.analysis.results import RunResults, load_run
from workflows import report_figures as figs

TEMPLATE = Path(__file__).with_name("report_template.html")
SUMMARY_FILE = "analysis.json"
MARKDOWN_FILE = "analysis.md"


def to_analysis_config(cfg: AnalysisConfig | DictConfig | Mapping | None = None,
                       overrides: list[str] | None = None) -> AnalysisConfig:
    """An AnalysisConfig from a config object or mapping (None: ``conf/analysis/default.yaml``),
    with dotted ``key=value`` overrides; unknown keys fail naming the key."""
    schema = OmegaConf.structured(AnalysisConfig)
    if cfg is None:
        cfg = OmegaConf.load(resources.files("conf") / "analysis" / "default.yaml")
    elif isinstance(cfg, AnalysisConfig):
        cfg = OmegaConf.structured(cfg)
    merged = OmegaConf.merge(schema, cfg, OmegaConf.from_dotlist(overrides or []))
    return OmegaConf.to_object(merged)


def _fmt(value: Any) -> str:
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
        cells = "".join(f"<td class='text'>{_fmt(v)}</td>" if isinstance(v, str) else f"<td>{_fmt(v)}</td>"
                        for v in row.values())
        body.append(f"<tr class='flag'>{cells}</tr>" if flagged and flagged[i] else f"<tr>{cells}</tr>")
    body = "".join(body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _checks_section(analysis: Analysis) -> str:
    rows = "".join(
        f"<tr><td class='text'>{html.escape(c.name)}</td>"
        f"<td class='text status-{c.status}'>{c.status}</td>"
        f"<td class='text'>{html.escape(c.summary)}"
        + (f"<details><summary>{len(c.details)} rows</summary>{html_table(c.details)}</details>"
           if c.details else "") + "</td></tr>"
        for c in analysis.checks)
    return ("<h2 id='validation'>Validation</h2><table><thead><tr><th>check</th><th>status</th>"
            f"<th>result</th></tr></thead><tbody>{rows}</tbody></table>")


def _pca_sections(run: RunResults, analysis: Analysis, cfg: AnalysisConfig) -> str:
    opts = cfg.report
    parts = ["<h2 id='pca'>PCA of the standardised tokens × components matrix</h2>",
             f"<p>{len(analysis.rows)} tokens, standardisation: {html.escape(cfg.standardize)}. "
             "PCs are signed so that their loadings sum to ≥ 0: a positive score is a token the "
             "loading-weighted components suppress, a negative one a token they express.</p>",
             figs.fragment(figs.variance_figure(analysis.pcas, opts.n_pcs_shown), "fig-variance"),
             html_table([{"pca": key, **{f"PC{k + 1} %": 100 * float(v) for k, v in
                                         enumerate(res.variance_explained[:opts.n_pcs_shown])}}
                         for key, res in analysis.pcas.items()])]
    rng = np.random.default_rng(cfg.seed)
    n = len(analysis.rows)
    shown = np.sort(rng.choice(n, opts.max_scatter_points, replace=False)) \
        if n > opts.max_scatter_points else np.arange(n)
    rows = analysis.rows[shown]
    hover = figs.hover_texts(run.tokens, rows)
    labels = analysis.classes.primary[rows]
    for key, res in analysis.pcas.items():
        pair = [f"<div><h3>{html.escape(key)}: loadings (mode–component couplings)</h3>"
                + figs.fragment(figs.loadings_figure(res, opts.n_pcs_shown), f"fig-loadings-{key}")
                + "</div>"]
        if res.scores.shape[1] >= 2:
            pair.append(f"<div><h3>{html.escape(key)}: token scores by class ({len(shown)} tokens)</h3>"
                        + figs.fragment(figs.scatter_figure(res.scores[shown], labels, hover),
                                        f"fig-scatter-{key}") + "</div>")
        parts.append(f"<div class='pair'>{''.join(pair)}</div>")
        parts.append(f"<p>{html.escape(key)}: mean token score per class (mode–data coupling; a "
                     "token counts in every class it has)</p>"
                     + html_table(class_score_means(analysis, key, opts.n_pcs_shown)))
    return "\n".join(parts)


def _diagnostics_section(run: RunResults, cfg: AnalysisConfig) -> str:
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
    return ("<h2 id='diagnostics'>Sampler diagnostics</h2>" + shared_note + "<p>Flagged (highlighted): diverged, "
            "unstable at the curvature pre-flight (<code>stability</code> = ε(nβλ + γ) above the bound), a g trace "
            "still drifting (<code>drift_z</code>), an LLC far from its sibling chains' (<code>llc_outlier</code>); "
            "these chains are <code>excluded</code> from every estimate or stop the study, per "
            f"<code>sampler.divergence_policy</code>. Also flagged: R-hat &gt; {rules.max_rhat} or ESS &lt; "
            f"{rules.min_ess}. <code>llc</code> is the "
            "weight-refined LLC of a head (the ordinary LLC for <code>full</code>).</p>"
            + html_table(summary_rows, [r["flagged chains"] > 0 for r in summary_rows])
            + f"<details><summary>every (component, chain): {len(flagged)} rows</summary>"
            + html_table(run.diagnostics.to_pylist(), list(flagged)) + "</details>")


def render(run: RunResults, analysis: Analysis, cfg: AnalysisConfig) -> str:
    """The report page as one HTML string."""
    opts = cfg.report
    probes = sorted(set(run.tokens.column("probe").to_pylist()))
    counts = {name: int((analysis.classes.primary == name).sum())
              for name in dict.fromkeys(analysis.classes.primary)}
    header = (
        f"<h1>Susceptibility report: {html.escape(run.run_dir.name)}</h1>"
        "<p class='sign'>Sign convention (per-component standardised χ): <b>negative = "
        "expression</b> (the component raises the probability of the continuation), <b>positive ="
        " suppression</b>.</p>"
        f"<p>{run.tokens.num_rows} probe tokens in probes {html.escape(', '.join(probes))}; "
        f"components analysed: {html.escape(' '.join(analysis.components))}"
        + (f"; <b>left out (non-finite or constant χ̂): {html.escape(' '.join(analysis.dropped))}</b>"
           if analysis.dropped else "") + ".</p>"
        + "<p>Token classes (primary label): " + html.escape(", ".join(
            f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))) + "</p>")
    heatmap = ("<h2 id='response'>Response matrix</h2>"
               f"<p>Probes × components, column <code>{html.escape(opts.heatmap_value)}</code>.</p>"
               + figs.fragment(figs.heatmap_figure(run.response, opts.heatmap_value,
                                                   opts.diverging_colorscale), "fig-heatmap"))
    replication = ("<h2 id='replication'>Replication of the paper's structural finding</h2><p>Our figures beside "
                   "the paper's (SCIENCE.md §5); flagged rows missed the acceptance rule of "
                   "<code>analysis.replication</code>.</p>"
                   + html_table(analysis.replication, [r["status"] == "flag" for r in analysis.replication])
                   if analysis.replication else "")
    content = "\n".join([header, replication, _checks_section(analysis), _pca_sections(run, analysis, cfg),
                         heatmap, _diagnostics_section(run, cfg)])
    viewer = figs.viewer_payload(run.tokens, analysis, standardized_all(run, analysis), opts)
    values = {"title": html.escape(f"Susceptibility report: {run.run_dir.name}"),
              "plotlyjs": get_plotlyjs(), "content": content,
              "viewer_data": embedded_json(viewer)}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text())


def embedded_json(data) -> str:
    """JSON for a <script> element whatever the strings hold: every "<" escaped as \\u003c, so no token text
    (``</script>``, ``<!--<script>``) can end or re-open the element."""
    return json.dumps(data).replace("<", "\\u003c")


def summary(analysis: Analysis, cfg: AnalysisConfig) -> dict:
    """Machine-readable numbers of the analysis (written to ``analysis.json``)."""
    return {
        "config": asdict(cfg),
        "components": list(analysis.components), "dropped": list(analysis.dropped),
        "n_tokens": len(analysis.rows),
        "pcas": {key: {"components": list(res.components),
                       "variance_explained": res.variance_explained.tolist(),
                       "loadings": res.loadings.tolist()} for key, res in analysis.pcas.items()},
        "checks": [{"name": c.name, "status": c.status, "summary": c.summary}
                   for c in analysis.checks],
        "replication": analysis.replication,
    }


def markdown(analysis: Analysis, n_pcs: int) -> str:
    """Variance explained and loadings per PCA, and the checks, as Markdown (for a README)."""
    pcs = [f"PC{k + 1}" for k in range(n_pcs)]
    lines = ["| PCA | " + " | ".join(f"{p} var. %" for p in pcs) + " |", "|---" * (n_pcs + 1) + "|"]
    lines += [f"| {key} | " + " | ".join(f"{100 * v:.2f}" for v in res.variance_explained[:n_pcs]) + " |"
              for key, res in analysis.pcas.items()]
    for key, res in analysis.pcas.items():
        k = min(n_pcs, len(res.loadings))
        lines += ["", f"Loadings, PCA {key}:", "", "| component | " + " | ".join(pcs[:k]) + " |",
                  "|---" * (k + 1) + "|"]
        lines += [f"| {c} | " + " | ".join(f"{res.loadings[j, i]:+.3f}" for j in range(k)) + " |"
                  for i, c in enumerate(res.components)]
        lines += ["", f"Mean token score per class, PCA {key}:", "",
                  "| class | tokens | " + " | ".join(pcs[:k]) + " |", "|---" * (k + 2) + "|"]
        lines += [f"| {r['class']} | {r['tokens']} | " + " | ".join(f"{r[p]:+.3f}" for p in pcs[:k]) + " |"
                  for r in class_score_means(analysis, key, k)]
    lines += ["", *(f"- {c.name}: **{c.status}**, {c.summary}" for c in analysis.checks)]
    if analysis.replication:
        lines += ["", "Replication (the paper's figures beside ours):", "",
                  "| figure | PCA | ours | interval | paper | status |", "|---|---|---|---|---|---|"]
        lines += ["| " + " | ".join(str(r[k]).replace("|", "\\|") for k in ("figure", "pca", "ours", "interval", "paper",
                                                                          "status")) + " |"
                  for r in analysis.replication]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, analysis_cfg: AnalysisConfig | DictConfig | Mapping | None = None
                 ) -> Path:
    """Analyse a run directory; write ``<run_dir>/<report.filename>``, ``analysis.json`` and
    ``analysis.md`` (the numbers a README records).

    Returns the report's path. analysis_cfg: an AnalysisConfig, the study's ``cfg.analysis`` node,
    a mapping of overrides, or None for ``conf/analysis/default.yaml``.
    """
    cfg = to_analysis_config(analysis_cfg)
    run = load_run(run_dir)
    analysis = analyze(run, cfg)
    (run.run_dir / SUMMARY_FILE).write_text(json.dumps(summary(analysis, cfg), indent=2))
    (run.run_dir / MARKDOWN_FILE).write_text(markdown(analysis, cfg.report.n_pcs_shown))
    path = run.run_dir / cfg.report.filename
    path.write_text(render(run, analysis, cfg), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a finished study run directory")
    parser.add_argument("overrides", nargs="*", help="dotted AnalysisConfig overrides, key=value")
    args = parser.parse_args(argv)
    path = write_report(args.run_dir, to_analysis_config(None, args.overrides))
    print(path)


if __name__ == "__main__":
    main()
