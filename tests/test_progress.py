"""Unit progress (``workflows.progress``) without Ray: the reporter's throttle and the driver's view of the units."""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

from workflows.progress import Board, Reporter, View


def test_reporter_forwards_the_first_report_then_at_most_one_per_interval_and_always_the_last():
    sent = []
    report = Reporter(lambda key, done, total: sent.append((key, done, total)), "u1", interval_s=3600.0)
    for done in range(0, 11):
        report(done, 10)
    assert sent == [("u1", 0, 10), ("u1", 10, 10)]
    every = Reporter(lambda key, done, total: sent.append((key, done, total)), "u2", interval_s=0.0)
    every(1, 4)
    every(2, 4)
    assert sent[-2:] == [("u2", 1, 4), ("u2", 2, 4)]


def test_view_moves_the_bar_by_shares_of_units_and_ignores_reports_of_finished_ones(caplog):
    bar = tqdm(total=4, initial=1, file=io.StringIO())  # one unit was cached
    view = View(bar, log_s=0.0)
    before = view.last_change
    view.update({"a": (5, 10), "b": (0, 0)})  # a half done, b started
    assert bar.n == 1.5 and view.last_change >= before
    unchanged = view.last_change
    view.update({"a": (5, 10), "b": (0, 0)})  # no news: no sign of life
    assert view.last_change == unchanged
    view.unit_done("a")
    with caplog.at_level(logging.INFO, logger="progress"):
        view.update({"a": (10, 10), "b": (1, 4)})  # a's last report arrives after it finished
    assert bar.n == 2.25 and set(view.in_flight) == {"b"}
    assert "units: 2.25 of 4 done (1 in flight)" in caplog.text


def test_board_holds_only_the_units_in_flight():
    board = Board()
    board.report("a", 0, 0)
    board.report("b", 3, 10)
    board.report("a", 10, 10)  # a's last report
    assert board.snapshot() == {"b": (3, 10)}
