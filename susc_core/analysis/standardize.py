"""Per-component standardisation of the tokens × components susceptibility matrix (SCIENCE.md §2).

Raw χ̂ of a component carries an unknown positive factor Z_full/Z_C, so columns are comparable only
after standardisation: z-score (default) divides each column by its standard deviation over tokens;
"center" only subtracts the column mean. Both keep the sign convention (negative = expression).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

METHODS = ("zscore", "center")


class Standardization(NamedTuple):
    """Column statistics: ``z = (chi - center) / scale``; both arrays are [n_components]."""

    center: np.ndarray
    scale: np.ndarray


def zscore(values: np.ndarray) -> np.ndarray:
    """Column-wise z-score of ``values`` [rows, cols] with the population standard deviation; a constant
    column becomes 0 (e.g. the response matrix's ``chi_std`` over probes when there is one probe)."""
    std = values.std(axis=0)
    return (values - values.mean(axis=0)) / np.where(std > 0, std, 1.0)


def standardize(chi: np.ndarray, method: str = "zscore",
                components: Sequence[str] | None = None) -> tuple[np.ndarray, Standardization]:
    """Standardise each column of ``chi`` [n_tokens, n_components] over tokens.

    Returns the standardised matrix [n_tokens, n_components] (dimensionless for "zscore", raw units
    for "center") and the statistics used. The standard deviation is the population one (ddof=0).
    ``components`` only names columns in error messages.
    """
    if method not in METHODS:
        raise ValueError(f"unknown standardize method {method!r}; use one of {METHODS}")
    chi = np.asarray(chi, dtype=np.float64)
    if chi.ndim != 2 or chi.shape[0] < 2:
        raise ValueError(f"chi must be [n_tokens >= 2, n_components]; got shape {chi.shape}")
    names = list(components) if components is not None else [str(i) for i in range(chi.shape[1])]
    bad = [names[j] for j in np.flatnonzero(~np.isfinite(chi).all(axis=0))]
    if bad:
        raise ValueError(f"non-finite susceptibilities in components {bad}; drop them first "
                         "(see finite_components) or rerun them")
    center = chi.mean(axis=0)
    if method == "center":
        return chi - center, Standardization(center, np.ones_like(center))
    scale = chi.std(axis=0)
    flat = [names[j] for j in np.flatnonzero(scale == 0)]
    if flat:
        raise ValueError(f"components {flat} are constant over tokens, so a z-score is "
                         "undefined; drop them or use standardize='center'")
    return zscore(chi), Standardization(center, scale)


def finite_components(chi: np.ndarray, components: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split component names into (kept, dropped): dropped columns of ``chi`` [n_tokens,
    n_components] hold a NaN/inf (e.g. every chain diverged) or are constant over tokens."""
    chi = np.asarray(chi, dtype=np.float64)
    ok = np.isfinite(chi).all(axis=0)
    ok[ok] = chi[:, ok].std(axis=0) > 0
    return ([c for c, k in zip(components, ok) if k], [c for c, k in zip(components, ok) if not k])
