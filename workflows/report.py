"""The self-contained HTML report of a study run (issues 6, 17), plus ``analysis.json`` / ``analysis.md``.

    python -m workflows.report <run_dir> [validation.max_rhat=1.05 report.n_pcs_shown=4 ...]

Overrides are dotted keys of ``AnalysisConfig`` on top of ``conf/analysis/default.yaml``. The study
app calls ``write_report(run_dir, cfg.analysis)`` at its end. The page embeds plotly.js and all
data inline: it opens offline. Its sections are built in ``report_sections.py``, its figures and the token
viewer's data in ``report_figures.py``; ``report_template.html`` holds the page and the viewer's script.
"""

from __future__ import annotations

import argparse
import html
import json
import re
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig, OmegaConf
from plotly.offline import get_plotlyjs

from susc_core.analysis import Analysis, AnalysisConfig, analyze
from susc_core.analysis.analyze import class_score_means, extreme_classes, standardized_all
from susc_core.analysis.pca import PCAResult
from susc_core.analysis.results import RunResults, load_run
from workflows import report_figures as figs
from workflows import report_sections as sections

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


def render(run: RunResults, analysis: Analysis, cfg: AnalysisConfig) -> str:
    """The report page as one HTML string."""
    z_all = standardized_all(run, analysis)
    content = "\n".join([sections.header(run, analysis), sections.replication_section(analysis),
                         sections.checks_section(analysis), sections.pca_sections(run, analysis, cfg),
                         sections.non_head_section(analysis, z_all, cfg), sections.response_section(run, cfg.report),
                         sections.diagnostics_section(run, cfg)])
    values = {"title": html.escape(f"Susceptibility report: {run.run_dir.name}"),
              "plotlyjs": get_plotlyjs(), "content": content,
              "viewer_data": embedded_json(figs.viewer_payload(run, analysis, z_all, cfg.report))}
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text())


def embedded_json(data) -> str:
    """JSON for a <script> element whatever the strings hold: every "<" escaped as \\u003c, so no token text
    (``</script>``, ``<!--<script>``) can end or re-open the element."""
    return json.dumps(data).replace("<", "\\u003c")


def _pca_json(res: PCAResult) -> dict:
    return {"components": list(res.components), "variance_explained": res.variance_explained.tolist(),
            "loadings": res.loadings.tolist()}


def summary(analysis: Analysis, cfg: AnalysisConfig) -> dict:
    """Machine-readable numbers of the analysis (written to ``analysis.json``): the head PCAs, the token
    classes at each end of their PCs, the non-head components apart, the checks, the replication rows."""
    opts, nh = cfg.report, analysis.non_head
    return {
        "config": asdict(cfg),
        "components": list(analysis.components), "dropped": list(analysis.dropped),
        "n_tokens": len(analysis.rows),
        "pcas": {key: _pca_json(res) for key, res in analysis.pcas.items()},
        "extreme_classes": {key: extreme_classes(analysis, key, opts.n_pcs_shown, opts.extreme_fraction)
                            for key in analysis.pcas},
        "non_head": {"components": list(nh.components), "head_mode_r": nh.head_mode_r,
                     "pca": None if nh.pca is None else _pca_json(nh.pca)},
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
