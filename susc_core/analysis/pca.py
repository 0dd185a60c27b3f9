"""PCA of the standardised tokens × heads matrix, per layer and over all layers (SCIENCE.md §5).

Only attention heads enter these PCAs, as in the paper; the other components (embeddings, MLPs, whole
blocks, the unembedding) are analysed apart (``non_head.py``).

With Z [n_tokens, n_components] column-centred, the SVD ``Z = U · diag(s) · Vᵀ`` factorises the
response into modes α: ``Z[x, C] = Σ_α s_α · U[x, α] · V[C, α]``, where ``U[:, α]`` is the
*mode–data coupling* (unit norm over tokens), ``V[:, α]`` the *mode–component coupling* (unit norm
over components, = the PC's loadings) and ``s_α`` the mode's strength. Token scores are
``U · diag(s) = Z · V``; PC α explains ``s_α² / Σ s²`` of the variance.

Sign convention: each PC is flipped so that its loadings sum to >= 0 (ties: largest |loading|
positive). A PC1 with all loadings of one sign then has positive loadings, and a positive PC1 score
means a token all components suppress (positive standardised χ = suppression).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from susc_core.model.components import is_head

ALL_LAYERS = "all"  # key of the PCA over the heads of every layer


class PCAResult(NamedTuple):
    """One PCA; k = min(n_tokens, n_components) modes, ordered by decreasing strength."""

    components: tuple[str, ...]  # the columns analysed, in order
    singular_values: np.ndarray  # [k]  s_α (units of Z · sqrt(tokens))
    variance_explained: np.ndarray  # [k]  fraction s_α² / Σ s², sums to 1
    loadings: np.ndarray  # [k, n_components]  mode–component couplings Vᵀ, unit rows
    data_couplings: np.ndarray  # [n_tokens, k]  mode–data couplings U, unit columns
    scores: np.ndarray  # [n_tokens, k]  token scores U · diag(s) = Z · V


def pca(z: np.ndarray, components: Sequence[str]) -> PCAResult:
    """PCA of a standardised (column-centred) matrix ``z`` [n_tokens, n_components]."""
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] != len(components):
        raise ValueError(f"z must be [n_tokens, {len(components)}] (one column per component); "
                         f"got shape {z.shape}")
    if not np.allclose(z.mean(axis=0), 0.0, atol=1e-8 * max(1.0, float(np.abs(z).max(initial=0)))):
        raise ValueError("z must be column-centred; pass it through standardize() first")
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    flip = np.sign(vt.sum(axis=1))
    largest = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
    flip = np.where(np.isclose(vt.sum(axis=1), 0.0, atol=1e-12), largest, flip)
    u, vt = u * flip, vt * flip[:, None]
    total = float((s**2).sum())
    explained = s**2 / total if total > 0 else np.zeros_like(s)
    return PCAResult(tuple(components), s, explained, vt, u, u * s)


def split_heads(components: Sequence[str]) -> tuple[list[str], list[str]]:
    """(attention heads ``L{l}H{h}``, every other component: ``embed``, ``pos_embed``, ``L{l}.mlp``,
    whole blocks ``L{l}``, ``ln_final``, ``unembed``, ``full``), each in the given order."""
    heads = [c for c in components if is_head(c)]
    return heads, [c for c in components if not is_head(c)]


def layer_groups(components: Sequence[str], layers: Mapping[str, int]) -> dict[str, list[str]]:
    """Attention heads grouped by layer, ``{"L0": [...], "L1": [...], "all": [every head]}``.

    Non-head components are left out (they are analysed apart: ``non_head.py``); a layer with a
    single head is left out of the per-layer groups (a PCA of one column is trivial), and "all" is
    absent when there is no head."""
    missing = [c for c in components if c not in layers]
    if missing:
        raise ValueError(f"no layer index for components {missing}; the token table's "
                         "'layers' metadata must name every component column")
    heads, _ = split_heads(components)
    groups: dict[str, list[str]] = {}
    for c in heads:
        groups.setdefault(f"L{layers[c]}", []).append(c)
    groups = {k: v for k, v in sorted(groups.items(), key=lambda kv: int(kv[0][1:])) if len(v) > 1}
    return groups | ({ALL_LAYERS: heads} if heads else {})


def pca_by_layer(z: np.ndarray, components: Sequence[str],
                 layers: Mapping[str, int]) -> dict[str, PCAResult]:
    """PCA of the head columns of ``z`` [n_tokens, n_components] separately per layer and over all
    layers (non-head columns are not used). Keys as in ``layer_groups``.

    Columns of a layer are a subset of z's (already standardised) columns, so every per-layer matrix
    is column-centred too.
    """
    index = {c: j for j, c in enumerate(components)}
    return {name: pca(z[:, [index[c] for c in group]], group)
            for name, group in layer_groups(components, layers).items()}
