"""Plotly figures and the token viewer's data for the HTML report (``workflows/report.py``).

Figures are returned as HTML fragments without plotly.js (the page embeds it once, inline).
"""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
import pyarrow as pa

from susc_core.analysis import Analysis, ReportOptions
from susc_core.analysis.pca import PCAResult
from susc_core.analysis.token_classes import CLASSES, OTHER

PLOT_CONFIG = {"displaylogo": False, "responsive": True}
# percentile of |value| that maps to the ends of the viewer's colour scale (outliers saturate)
VIEWER_SCALE_PERCENTILE = 99.0
HOVER_CONTEXT_TOKENS = 6  # tokens of left context shown when hovering a scatter point
# one fixed colour per token class, the same in every scatter
CLASS_COLOURS = dict(zip((*CLASSES, OTHER), qualitative.D3))


def fragment(fig: go.Figure, div_id: str) -> str:
    """A figure as an HTML <div> + <script> fragment (plotly.js not included)."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)


def contexts(tokens: pa.Table) -> list[tuple[str, int, np.ndarray]]:
    """Every (probe, context_id, row indices in position order) of a token table, sorted."""
    probe = np.asarray(tokens.column("probe").to_pylist(), dtype=object)
    context = tokens.column("context_id").to_numpy()
    _, code = np.unique(probe, return_inverse=True)
    order = np.lexsort((tokens.column("position").to_numpy(), context, code))
    breaks = np.flatnonzero((code[order][1:] != code[order][:-1])
                            | (context[order][1:] != context[order][:-1])) + 1
    return [(probe[rows[0]], int(context[rows[0]]), rows) for rows in np.split(order, breaks)
            if len(rows)]


def hover_texts(tokens: pa.Table, rows: np.ndarray) -> list[str]:
    """For each row index: probe, then a few tokens of left context and the token in brackets."""
    texts = tokens.column("token_text").to_pylist()
    probe = tokens.column("probe").to_pylist()
    before = {}
    for _, _, ctx_rows in contexts(tokens):
        for i, r in enumerate(ctx_rows):
            before[r] = ctx_rows[max(0, i - HOVER_CONTEXT_TOKENS):i]
    shown = []
    for r in rows:
        left = "".join(texts[j] for j in before[r]).replace("\n", "↵")
        shown.append(html.escape(f"{probe[r]}: …{left}[{texts[r]}]"))
    return shown


def variance_figure(pcas: Mapping[str, PCAResult], n_pcs: int) -> go.Figure:
    """Grouped bars: % variance explained by PC1..PCn, one bar group per PCA."""
    fig = go.Figure([go.Bar(name=key, x=[f"PC{k + 1}" for k in range(min(n_pcs, len(res.singular_values)))],
                            y=100 * res.variance_explained[:n_pcs],
                            text=[f"{100 * v:.1f}%" for v in res.variance_explained[:n_pcs]])
                     for key, res in pcas.items()])
    fig.update_layout(barmode="group", yaxis_title="variance explained (%)", height=360,
                      margin=dict(t=30, b=40))
    return fig


def loadings_figure(res: PCAResult, n_pcs: int) -> go.Figure:
    """Grouped bars of PC1..PCn loadings (mode–component couplings) per component."""
    fig = go.Figure([go.Bar(name=f"PC{k + 1}", x=list(res.components), y=res.loadings[k])
                     for k in range(min(n_pcs, len(res.loadings)))])
    fig.update_layout(barmode="group", yaxis_title="loading", height=340, margin=dict(t=30, b=40))
    return fig


def scatter_figure(scores: np.ndarray, labels: np.ndarray, hover: Sequence[str]) -> go.Figure:
    """Token PCA scatter: scores [n, >=2] (PC1, PC2), one trace per token class."""
    fig = go.Figure()
    for name in (*CLASSES, OTHER):
        mask = labels == name
        if mask.any():
            fig.add_trace(go.Scatter(x=scores[mask, 0], y=scores[mask, 1], mode="markers", name=name,
                                     marker=dict(size=5, opacity=0.7, color=CLASS_COLOURS[name]),
                                     text=[h for h, m in zip(hover, mask) if m],
                                     hovertemplate="%{text}<br>PC1 %{x:.3f}, PC2 %{y:.3f}"))
    fig.update_layout(xaxis_title="PC1 score", yaxis_title="PC2 score", height=460,
                      margin=dict(t=30, b=40))
    return fig


def heatmap_figure(response: pa.Table, value: str, colorscale: str) -> go.Figure:
    """Probes × components heatmap of a response_matrix column, centred on 0."""
    if value not in response.column_names:
        raise ValueError(f"report.heatmap_value {value!r} is not a response_matrix column; "
                         f"valid: {response.column_names}")
    probes = sorted(set(response.column("probe").to_pylist()))
    comps = list(dict.fromkeys(response.column("component").to_pylist()))
    grid = np.full((len(probes), len(comps)), np.nan)
    for p, c, v in zip(*(response.column(k).to_pylist() for k in ("probe", "component", value))):
        grid[probes.index(p), comps.index(c)] = np.nan if v is None else v
    fig = go.Figure(go.Heatmap(z=grid, x=comps, y=probes, zmid=0, colorscale=colorscale,
                               colorbar=dict(title=value),
                               hovertemplate="%{y} × %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(height=120 + 32 * len(probes), margin=dict(t=30, b=40))
    return fig


def viewer_payload(tokens: pa.Table, analysis: Analysis, z_all: np.ndarray,
                   opts: ReportOptions) -> dict:
    """Data of the token viewer: the first ``viewer_max_contexts_per_probe`` contexts of each
    probe (by context_id) with, per token, its standardised χ for every component and its score
    on PC1..PCn of every PCA. z_all: [n_rows, n_components] standardised χ of every row."""
    series: dict[str, np.ndarray] = {c: z_all[:, j] for j, c in enumerate(analysis.components)}
    for key, res in analysis.pcas.items():
        cols = [analysis.components.index(c) for c in res.components]
        for k in range(min(opts.n_pcs_shown, len(res.loadings))):
            series[f"PC{k + 1} ({key})"] = z_all[:, cols] @ res.loadings[k]
    texts = tokens.column("token_text").to_pylist()
    shown, per_probe = [], {}
    for probe, context_id, rows in contexts(tokens):
        per_probe[probe] = per_probe.get(probe, 0) + 1
        if per_probe[probe] <= opts.viewer_max_contexts_per_probe:
            shown.append((probe, context_id, rows))
    every = np.concatenate([rows for _, _, rows in shown])
    keys = [{"id": key, "scale": float(np.percentile(np.abs(v[every]), VIEWER_SCALE_PERCENTILE)) or 1.0}
            for key, v in series.items()]
    return {"keys": keys, "contexts": [
        {"probe": probe, "context_id": context_id, "tokens": [texts[r] for r in rows],
         "classes": [str(analysis.classes.primary[r]) for r in rows],
         "values": {key: np.round(v[rows], 4).tolist() for key, v in series.items()}}
        for probe, context_id, rows in shown]}
