"""The unit cache heals itself (damaged or misplaced files are moved aside and recomputed) and concurrent
studies on one cache compute every unit once."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from workflows.execute import ClusterConfig, run_units
from workflows.plan import plan_units
from workflows.unit_store import CORRUPT_DIR, UnitStore

STATS = {("L0H0", 0): {"sum_g": np.array(1.5), "sum_ga": np.arange(4.0)},
         ("full", 0): {"sum_g": np.array(2.5), "sum_ga": np.ones(4)}}


def _damage(path: Path, how: str, other: Path) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped":  # a byte of an array's data, past the zip headers
        at = data.index(np.arange(4.0).tobytes()) + 3
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
    elif how == "copied":
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped", "copied"])
def test_a_damaged_unit_is_named_moved_aside_and_counts_as_missing(tmp_path, how, caplog):
    store = UnitStore(tmp_path)
    store.save("aaaa", STATS)
    store.save("bbbb", {("L0H1", 1): {"sum_g": np.array(9.0)}})
    assert store.get("aaaa")[("L0H0", 0)]["sum_ga"].tolist() == [0, 1, 2, 3]
    _damage(store.path("aaaa"), how, store.path("bbbb"))
    with caplog.at_level(logging.WARNING, logger="unit_store"):
        assert store.get("aaaa") is None
    assert str(store.path("aaaa")) in caplog.text and "recomputed" in caplog.text
    assert not store.path("aaaa").exists() and len(list((tmp_path / CORRUPT_DIR).glob("aaaa.*.npz"))) == 1
    assert store.get("aaaa") is None  # still missing
    assert store.get("bbbb") is not None  # the other unit is untouched


def test_run_units_recomputes_a_damaged_unit(tmp_path):
    units = plan_units(["L0H0", "full"], 2, 1, 0, 1, {"x": 1})
    store = UnitStore(tmp_path)
    calls = []

    def task(unit, shared, on_progress):
        calls.append(unit.key)
        return {(c, k): {"sum_g": np.array(float(k))} for c in unit.components for k in unit.chains}

    cluster = ClusterConfig(executor="inprocess")
    assert run_units(units, task, {}, cluster, store).computed == 2
    store.path(units[1].key).write_bytes(b"garbage")
    report = run_units(units, task, {}, cluster, store)
    assert (report.cached, report.computed) == (1, 1) and calls == [u.key for u in units] + [units[1].key]
    assert store.get(units[1].key)[("full", 1)]["sum_g"] == 1.0
    assert report.stats[units[1].key][("full", 1)]["sum_g"] == 1.0  # handed over as computed
    assert report.stats[units[0].key] == store.get(units[0].key)  # handed over as read
    assert not list(tmp_path.glob("*.claim"))  # claims are released


def test_claims_respect_live_studies_and_take_over_dead_ones(tmp_path):
    store = UnitStore(tmp_path, stale_s=60)
    claim = store.claim_path("k")
    claim.write_text(json.dumps({"host": store.owner["host"], "pid": os.getppid()}))  # alive
    assert not store.claim("k")
    dead = multiprocessing.Process(target=int)
    dead.start()
    dead.join()
    claim.write_text(json.dumps({"host": store.owner["host"], "pid": dead.pid}))
    assert store.claim("k") and json.loads(claim.read_text()) == store.owner
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # another host, fresh
    assert not store.claim("k")
    old = time.time() - 120
    os.utime(claim, (old, old))
    assert store.claim("k")
    store.release("k")
    assert not claim.exists()


def _study(root: str, keys_log: str, units) -> None:
    def task(unit, shared, on_progress):
        with open(keys_log, "a") as f:
            f.write(unit.key + "\n")
        time.sleep(0.3)
        return {(c, k): {"sum_g": np.array(1.0)} for c in unit.components for k in unit.chains}

    run_units(units, task, {}, ClusterConfig(executor="inprocess", claim_poll_s=0.1), UnitStore(root))


def test_two_studies_on_one_cache_compute_every_unit_once(tmp_path):
    units = plan_units(["L0H0", "L0H1", "full"], 4, 1, 1, 1, {"x": 2})  # 12 units
    log = tmp_path / "computed.txt"
    ctx = multiprocessing.get_context("fork")
    studies = [ctx.Process(target=_study, args=(str(tmp_path / "cache"), str(log), units)) for _ in range(2)]
    for p in studies:
        p.start()
    for p in studies:
        p.join(60)
    assert [p.exitcode for p in studies] == [0, 0]
    computed = log.read_text().split()
    assert sorted(computed) == sorted(u.key for u in units)  # each once, none lost
    store = UnitStore(tmp_path / "cache")
    assert all(store.get(u.key) is not None for u in units) and not list((tmp_path / "cache").glob("*.claim"))
