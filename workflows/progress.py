"""How far the units in flight have got: each unit reports its draws, the driver shows them on the study's
bar, logs them with the time left, and takes them as the sign of life its wait for units goes by.

A unit gets a ``Reporter`` (a callable ``(done, total)`` in chain·draws, ``chains.sample_plan``'s
``on_progress``) that forwards at most one report per ``cluster.progress_interval_s``, and always the last. In
this process the reports go straight to the driver's ``View``; from Ray workers they go to a ``Board`` actor,
which the driver reads while it waits (``View.update``).
"""

from __future__ import annotations

import logging
import time
from typing import Callable

# plain logging, not workflows.runtime: the Board actor's process imports this module, and runtime imports torch
log = logging.getLogger("progress")
Send = Callable[[str, int, int], None]  # (unit key, chain·draws done, chain·draws of the unit)


class Board:
    """The latest report of every unit in flight, {unit key: (done, total)}; run as a Ray actor, written by the
    units. A unit's last report (done == total) drops it, so a snapshot stays the size of the units in flight,
    not of the study (the driver counts the unit done when its result arrives)."""

    def __init__(self):
        self.units: dict[str, tuple[int, int]] = {}

    def report(self, key: str, done: int, total: int) -> None:
        if 0 < total == done:
            self.units.pop(key, None)
        else:
            self.units[key] = (done, total)

    def snapshot(self) -> dict[str, tuple[int, int]]:
        return dict(self.units)


def sender(sink) -> Send:
    """Where a unit's reports go: a ``Board`` actor handle (from a Ray worker: its ``report``, sent without
    waiting) or a plain ``Send`` callable (in the driver's process)."""
    return sink.report.remote if hasattr(sink, "report") else sink


class Reporter:
    """A unit's ``on_progress``: forwards (done, total) through ``send`` at most every ``interval_s`` seconds,
    and the last report (done == total) always."""

    def __init__(self, send: Send, key: str, interval_s: float):
        self.send, self.key, self.interval_s = send, key, interval_s
        self.last = float("-inf")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.interval_s:
            return
        self.last = now
        self.send(self.key, done, total)


class View:
    """The driver's side: the study's bar (``tqdm``, in units) advanced by the finished units plus the finished
    share of every unit in flight, a log line with the time left every ``log_s`` seconds, and ``last_change``:
    when a unit last finished or reported progress (``time.monotonic``)."""

    def __init__(self, bar, log_s: float):
        self.bar, self.log_s = bar, log_s
        self.finished = bar.n  # units done (cached or computed), whole
        self.done_keys: set[str] = set()  # units finished in this study
        self.in_flight: dict[str, float] = {}  # unit key -> its finished share
        self.start = self.last_change = self.last_log = time.monotonic()
        self.initial = bar.n

    def report(self, key: str, done: int, total: int) -> None:
        """One unit's report (also the ``Send`` of units run in this process)."""
        self._record(key, done, total)
        self._show()

    def update(self, snapshot: dict[str, tuple[int, int]]) -> None:
        """Every report of a ``Board`` snapshot; units already finished are ignored."""
        for key, (done, total) in snapshot.items():
            if key not in self.done_keys:
                self._record(key, done, total)
        self._show()

    def _record(self, key: str, done: int, total: int) -> None:
        share = done / total if total > 0 else 0.0  # total 0: started, no draw yet
        if self.in_flight.get(key) != share:
            self.in_flight[key] = share
            self.last_change = time.monotonic()

    def unit_done(self, key: str) -> None:
        """A unit finished (computed here, or found in the cache)."""
        self.in_flight.pop(key, None)
        self.done_keys.add(key)
        self.finished += 1
        self.last_change = time.monotonic()
        self._show()

    def _show(self) -> None:
        position = self.finished + sum(self.in_flight.values())
        self.bar.update(position - self.bar.n)
        now = time.monotonic()
        if now - self.last_log < self.log_s or position >= self.bar.total:
            return
        self.last_log = now
        rate = (position - self.initial) / (now - self.start)  # units per second in this study
        left = "unknown" if rate <= 0 else f"~{(self.bar.total - position) / rate / 60:.1f} min"
        log.info("units: %.2f of %d done (%d in flight); time left %s", position, self.bar.total,
                 len(self.in_flight), left)
