"""Streaming susceptibility statistics of one chain, in float64, mergeable exactly.

Per draw d a chain records g_d = L_n(draw) - L_n(w*) on the fixed observable contexts and, for every
probe token t, A_dt = l_t(draw) - L_n(draw). The sums are centred on the values at w*:
a_dt = A_dt - A*_t with A*_t = l_t(w*) - L_n(w*) (covariances are unchanged by the shift, and the
sums lose no precision to a large mean). ``ChainStats`` holds

    count, sum_g = Σ g, sum_g2 = Σ g², sum_a = Σ a [T], sum_ga = Σ g·a [T], sum_a2 = Σ a² [T],

the g trace [count] (for R-hat / ESS), the divergence step, and the reference values at w*.
``merge`` joins consecutive draw blocks of one chain (sums add; associative and commutative);
``concat_tokens`` joins probe-token shards; ``pool`` adds the chains of one component.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

_REF_RTOL = 1e-6  # how closely two shards' values at w* must agree to be merged


class ChainStats(NamedTuple):
    """Sums of one chain over draws ``first_draw .. first_draw + count - 1`` (float64 numpy)."""

    count: int
    first_draw: int
    sum_g: float
    sum_g2: float
    sum_a: np.ndarray  # [T]
    sum_ga: np.ndarray  # [T]
    sum_a2: np.ndarray  # [T]
    g_trace: np.ndarray  # [count]
    diverged_step: int  # first SGLD step (1-based) at which the chain diverged; -1 if never; 0: excluded by a
    # sampler diagnostic (``workflows.screening``)
    loss_star: float  # L_n(w*) on the observable contexts (nats)
    a_star: np.ndarray  # [T] A*_t = l_t(w*) - L_n(w*)

    @property
    def diverged(self) -> bool:
        return self.diverged_step >= 0


class Pooled(NamedTuple):
    """Sums over several chains of one component (diverged chains excluded)."""

    n_chains: int
    count: int
    sum_g: float
    sum_g2: float
    sum_a: np.ndarray
    sum_ga: np.ndarray
    sum_a2: np.ndarray


def from_draws(g: np.ndarray, a: np.ndarray, loss_star: float, a_star: np.ndarray, first_draw: int = 0,
               diverged_step: int = -1) -> ChainStats:
    """Stats from explicit per-draw values: g [D], a [D, T] (already centred on w*). For tests/small runs."""
    g = np.asarray(g, np.float64)
    a = np.asarray(a, np.float64)
    return ChainStats(len(g), first_draw, float(g.sum()), float((g * g).sum()), a.sum(0), (g[:, None] * a).sum(0),
                      (a * a).sum(0), g.copy(), diverged_step, float(loss_star), np.asarray(a_star, np.float64))


def _check_same_reference(x: ChainStats, y: ChainStats) -> None:
    if not np.isclose(x.loss_star, y.loss_star, rtol=_REF_RTOL) or x.a_star.shape != y.a_star.shape \
            or not np.allclose(x.a_star, y.a_star, rtol=_REF_RTOL, atol=_REF_RTOL):
        raise ValueError("cannot merge statistics computed at different w* or on different observable/probe "
                         "contexts (their values at w* differ)")


def _first_divergence(*steps: int) -> int:
    hit = [s for s in steps if s >= 0]
    return min(hit) if hit else -1


def merge(x: ChainStats, y: ChainStats) -> ChainStats:
    """Join two consecutive draw blocks of the same chain (in either argument order)."""
    _check_same_reference(x, y)
    x, y = sorted((x, y), key=lambda s: s.first_draw)
    if x.first_draw + x.count != y.first_draw:
        raise ValueError(f"draw blocks [{x.first_draw}, {x.first_draw + x.count}) and "
                         f"[{y.first_draw}, {y.first_draw + y.count}) are not consecutive")
    return ChainStats(x.count + y.count, x.first_draw, x.sum_g + y.sum_g, x.sum_g2 + y.sum_g2, x.sum_a + y.sum_a,
                      x.sum_ga + y.sum_ga, x.sum_a2 + y.sum_a2, np.concatenate([x.g_trace, y.g_trace]),
                      _first_divergence(x.diverged_step, y.diverged_step), x.loss_star, x.a_star)


def concat_tokens(x: ChainStats, y: ChainStats) -> ChainStats:
    """Join two probe-token shards (tokens of ``x`` first) of the same chain and draws."""
    if (x.count, x.first_draw) != (y.count, y.first_draw) or not np.allclose(x.g_trace, y.g_trace) \
            or not np.isclose(x.loss_star, y.loss_star, rtol=_REF_RTOL):
        raise ValueError("token shards must come from the same chain, draws and observable contexts")
    cat = np.concatenate
    return x._replace(sum_a=cat([x.sum_a, y.sum_a]), sum_ga=cat([x.sum_ga, y.sum_ga]),
                      sum_a2=cat([x.sum_a2, y.sum_a2]), a_star=cat([x.a_star, y.a_star]),
                      diverged_step=_first_divergence(x.diverged_step, y.diverged_step))


def pool(chains: Sequence[ChainStats]) -> Pooled:
    """Add the sums of the non-diverged chains of one component. Raises if none is left."""
    kept = [c for c in chains if not c.diverged]
    if not kept:
        raise ValueError("no chain left to estimate from: every chain diverged or was excluded by a sampler "
                         "diagnostic (see diagnostics.parquet); lower sampler.step_size or nbeta")
    for c in kept[1:]:
        _check_same_reference(kept[0], c)
    return Pooled(len(kept), sum(c.count for c in kept), sum(c.sum_g for c in kept), sum(c.sum_g2 for c in kept),
                  sum(c.sum_a for c in kept), sum(c.sum_ga for c in kept), sum(c.sum_a2 for c in kept))
