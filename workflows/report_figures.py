"""Plotly figures and the token viewer's data for the HTML report (``workflows/report.py``).

Figures are returned as HTML fragments without plotly.js (the page embeds it once, inline).
"""

from __future__ import annotations

import html
import math
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
import pyarrow as pa

from susc_core.analysis import Analysis, ReportOptions
from susc_core.analysis.pca import ALL_LAYERS, PCAResult, split_heads
from susc_core.analysis.results import RunResults, Trace
from susc_core.analysis.token_classes import CLASSES, OTHER

PLOT_CONFIG = {"displaylogo": False, "responsive": True}
# percentile of |value| that maps to the ends of the viewer's colour scale (outliers saturate)
VIEWER_SCALE_PERCENTILE = 99.0
HOVER_CONTEXT_TOKENS = 6  # tokens of left context shown when hovering a scatter point
# one fixed colour per token class, the same in every scatter
CLASS_COLOURS = dict(zip((*CLASSES, OTHER), qualitative.D3))
# the two ends of every diverging scale (viewer bands, Fig. 3 bars): expression blue, suppression red
EXPRESSION_RGB, SUPPRESSION_RGB, NEUTRAL_RGB = (33, 102, 172), (178, 24, 43), (150, 150, 150)


def rgb(colour: tuple[int, int, int]) -> str:
    """A CSS colour from an (r, g, b) tuple."""
    return f"rgb{colour}"


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


def loadings_figure(res: PCAResult, n_pcs: int, roles: Mapping[str, str]) -> go.Figure:
    """Grouped bars of PC1..PCn loadings (mode–component couplings) per component, each head labelled
    with its measured role under its name when ``roles`` (component -> role) has it."""
    labels = [f"{c}<br><i>{html.escape(roles[c])}</i>" if c in roles else c for c in res.components]
    fig = go.Figure([go.Bar(name=f"PC{k + 1}", x=labels, y=res.loadings[k])
                     for k in range(min(n_pcs, len(res.loadings)))])
    fig.update_layout(barmode="group", yaxis_title="loading", height=340 + (20 if roles else 0),
                      margin=dict(t=30, b=40))
    return fig


def extreme_classes_figure(shares: Mapping[str, list[dict]], fraction: float) -> go.Figure:
    """The paper's Fig. 3: one panel per PC (``analyze.extreme_classes``), grouped bars of each token
    class's share among the PC's lowest-scoring tokens (the expression side), among all tokens, and
    among its highest-scoring tokens (the suppression side)."""
    pcs = list(shares)
    fig = make_subplots(rows=1, cols=len(pcs), subplot_titles=pcs, shared_yaxes=True,
                        horizontal_spacing=0.02)
    ends = (("high", f"highest {100 * fraction:g}% (suppression)", SUPPRESSION_RGB),
            ("all", "all tokens", NEUTRAL_RGB),
            ("low", f"lowest {100 * fraction:g}% (expression)", EXPRESSION_RGB))
    n_classes = max((len(rows) for rows in shares.values()), default=0)
    for i, pc in enumerate(pcs):
        for end, label, colour in ends:
            fig.add_trace(go.Bar(y=[r["class"] for r in shares[pc]], x=[100 * r[end] for r in shares[pc]],
                                 orientation="h", name=label, legendgroup=end, showlegend=i == 0,
                                 marker_color=rgb(colour),
                                 hovertemplate="%{y}: %{x:.1f}%<extra>" + label + "</extra>"), row=1, col=i + 1)
        fig.update_xaxes(title_text="tokens with the class (%)", row=1, col=i + 1)
    fig.update_layout(barmode="group", height=140 + 42 * n_classes, margin=dict(t=40, b=40),
                      legend=dict(orientation="h", traceorder="reversed", y=-0.15))
    fig.update_yaxes(autorange="reversed")
    return fig


def trace_figure(traces: Mapping[str, Sequence[Trace]], labels: Mapping[str, str], max_draws: int) -> go.Figure:
    """SGLD traces: g = L_n(draw) − L_n(w*) per draw, one line per chain, one component at a time
    (a dropdown picks it; ``labels`` gives each its menu label). A trace longer than ``max_draws`` is
    thinned evenly (every k-th draw); chains left out of the estimates are dotted."""
    fig, owner = go.Figure(), []
    for comp, chains in traces.items():
        for t in chains:
            draws = np.arange(0, len(t.g), max(1, math.ceil(len(t.g) / max_draws)))
            fig.add_trace(go.Scatter(x=draws + 1, y=np.where(np.isfinite(t.g[draws]), t.g[draws], np.nan),
                                     mode="lines", name=f"chain {t.chain}" + (" (left out)" if t.diverged else ""),
                                     line=dict(width=1, dash="dot" if t.diverged else "solid"),
                                     visible=not owner or owner[0] == comp))
            owner.append(comp)
    buttons = [dict(label=labels.get(comp, comp), method="restyle", args=[{"visible": [o == comp for o in owner]}])
               for comp in traces]
    fig.update_layout(height=420, margin=dict(t=50, b=40), xaxis_title="draw",
                      yaxis_title="g = L_n(draw) − L_n(w*) (nats)",
                      updatemenus=[dict(buttons=buttons, direction="down", x=0, xanchor="left", y=1.15,
                                        yanchor="top")])
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


def viewer_series(analysis: Analysis, z_all: np.ndarray, layers: Mapping[str, int],
                  n_pcs: int) -> dict[str, tuple[str, np.ndarray]]:
    """Every quantity the viewer can draw as a band: id -> (menu group, values [n_rows]): each
    component's standardised χ (heads grouped by layer, then the non-head components), then the scores
    on PC1..PCn of every head PCA. z_all: [n_rows, n_components] standardised χ of every row."""
    heads, others = split_heads(analysis.components)
    index = {c: j for j, c in enumerate(analysis.components)}
    series = {c: (f"layer {layers[c]} heads", z_all[:, index[c]]) for c in heads}
    series |= {c: ("non-head components", z_all[:, index[c]]) for c in others}
    for key, res in analysis.pcas.items():
        cols = [index[c] for c in res.components]
        for k in range(min(n_pcs, len(res.loadings))):
            series[f"PC{k + 1} ({key})"] = (f"PC scores ({key})", z_all[:, cols] @ res.loadings[k])
    return series


def default_bands(analysis: Analysis, layers: Mapping[str, int], n: int) -> list[str]:
    """The ``n`` components the viewer shows when the page opens: the heads with the largest |PC2
    loading| over all heads (the paper's induction vs multigram axis), else the heads of the last
    layer, else the first components."""
    heads, _ = split_heads(analysis.components)
    res = analysis.pcas.get(ALL_LAYERS)
    if res is not None and len(res.loadings) >= 2:
        order = np.argsort(-np.abs(res.loadings[1]), kind="stable")
        return [res.components[i] for i in order[:n]]
    if heads:
        last = max(layers[h] for h in heads)
        return [h for h in heads if layers[h] == last][:n]
    return list(analysis.components[:n])


def viewer_payload(run: RunResults, analysis: Analysis, z_all: np.ndarray, opts: ReportOptions) -> dict:
    """Data of the token viewer: the first ``viewer_max_contexts_per_probe`` contexts of each probe
    (by context_id) with, per token, every ``viewer_series`` value; each band's menu group, measured
    head role and colour scale; the bands shown first, the page size and the scale's end colours.
    z_all: [n_rows, n_components] standardised χ of every row of ``run.tokens``."""
    series = viewer_series(analysis, z_all, run.layers, opts.n_pcs_shown)
    roles, tokens = run.roles(), run.tokens
    texts = tokens.column("token_text").to_pylist()
    shown, per_probe = [], {}
    for probe, context_id, rows in contexts(tokens):
        per_probe[probe] = per_probe.get(probe, 0) + 1
        if per_probe[probe] <= opts.viewer_max_contexts_per_probe:
            shown.append((probe, context_id, rows))
    every = np.concatenate([rows for _, _, rows in shown])
    keys = [{"id": key, "group": group, "label": roles.get(key, ""),
             "scale": float(np.percentile(np.abs(v[every]), VIEWER_SCALE_PERCENTILE)) or 1.0}
            for key, (group, v) in series.items()]
    return {"keys": keys, "default": default_bands(analysis, run.layers, opts.viewer_default_components),
            "page": opts.viewer_page_tokens, "colours": {"expression": EXPRESSION_RGB, "suppression": SUPPRESSION_RGB},
            "contexts": [{"probe": probe, "context_id": context_id, "tokens": [texts[r] for r in rows],
                          "classes": [str(analysis.classes.primary[r]) for r in rows],
                          "values": {key: np.round(v[rows], 4).tolist() for key, (_, v) in series.items()}}
                         for probe, context_id, rows in shown]}
