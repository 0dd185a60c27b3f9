"""Components that are not attention heads (``embed``, ``pos_embed``, ``L{l}.mlp``, whole blocks ``L{l}``,
``ln_final``, ``unembed``), analysed apart from the per-layer head PCA (issue 17).

A whole block or an embedding moves the inputs of many heads at once; mixed into the heads' PCA, one such
column would stand for a sum of others and pull the modes towards it. Here each non-head component is set
against the heads' modes instead: the Pearson r of its standardised χ with the token scores on PC1..PCn
of the all-heads PCA (r near ±1: it responds like that mode, with that sign), and the non-head columns get
a PCA of their own when there are at least two.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from susc_core.analysis.pca import ALL_LAYERS, PCAResult, pca, split_heads
from susc_core.analysis.validation import pearson_r

NON_HEAD = "non-head"  # key of the non-head PCA in the report and analysis.json


class NonHeadAnalysis(NamedTuple):
    """The non-head components of a run and how they relate to the heads' modes."""

    components: tuple[str, ...]  # analysed non-head components, in token-table order
    pca: PCAResult | None  # PCA of their standardised columns alone; None with fewer than two
    head_mode_r: list[dict]  # per component: layer, Pearson r with the token scores of each head PC


def head_mode_correlations(columns: np.ndarray, names: Sequence[str], layers: Mapping[str, int],
                           heads: PCAResult | None, n_pcs: int) -> list[dict]:
    """One row per column of ``columns`` [n_tokens, n_names]: its layer and its Pearson r with the token
    scores [n_tokens] on PC1..PCn of the all-heads PCA ``heads`` (no r columns without one)."""
    n = 0 if heads is None else min(n_pcs, heads.scores.shape[1])
    return [{"component": c, "layer": int(layers[c]),
             **{f"r with heads' PC{k + 1}": pearson_r(columns[:, j], heads.scores[:, k]) for k in range(n)}}
            for j, c in enumerate(names)]


def non_head_analysis(z: np.ndarray, components: Sequence[str], layers: Mapping[str, int],
                      pcas: Mapping[str, PCAResult], n_pcs: int) -> NonHeadAnalysis:
    """The non-head columns of the standardised ``z`` [n_tokens, n_components] (columns = ``components``)
    against the head PCAs ``pcas`` (``pca_by_layer`` on the same tokens), and their own PCA."""
    _, others = split_heads(components)
    index = {c: j for j, c in enumerate(components)}
    columns = z[:, [index[c] for c in others]]
    rows = head_mode_correlations(columns, others, layers, pcas.get(ALL_LAYERS), n_pcs)
    return NonHeadAnalysis(tuple(others), pca(columns, others) if len(others) > 1 else None, rows)
