"""The private local Ray runtime of a study is not open to others: it authenticates with a per-run token, so a
client without it is refused, and it leaves no process behind, also when the study is interrupted (Ctrl-C)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from workflows.execute import ClusterConfig, run_units
from workflows.plan import plan_units
from workflows.unit_store import UnitStore

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.1  # how often the tests look at processes, files and signal handlers

STUDY_RUNTIME = """
import json, os, sys
import psutil
from workflows.execute import ClusterConfig, init_ray
init_ray(ClusterConfig(num_cpus=1))
import ray
assert ray.get(ray.remote(lambda: 1 + 1).remote()) == 2
me = psutil.Process()
listening = sorted({f"{c.laddr.ip}" for p in [me, *me.children(recursive=True)]
                    for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})
children = [p.pid for p in me.children(recursive=True)]
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "mode": os.environ["RAY_AUTH_MODE"],
                  "listening": listening, "children": children}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""

INTRUDER = "import sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); print('CONNECTED')"


def test_a_client_without_the_runtime_token_is_refused():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    study = subprocess.Popen([sys.executable, "-c", STUDY_RUNTIME], cwd=ROOT, env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        info = json.loads(study.stdout.readline())
        assert info["mode"] == "token" and info["children"]
        # Ray 2.60 listens beyond the loopback interface (so the token matters); recorded, not required
        print("listening on", info["listening"])
        intruder = subprocess.run([sys.executable, "-c", INTRUDER, info["gcs"]], cwd=ROOT, text=True, timeout=120,
                                  env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True)
        assert intruder.returncode != 0 and "CONNECTED" not in intruder.stdout
        assert "Authentication" in intruder.stderr or "auth" in intruder.stderr.lower(), intruder.stderr[-2000:]
    finally:
        study.communicate("\n", timeout=120)
    assert study.returncode == 0
    alive = [pid for pid in info["children"] if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"runtime processes left behind: {alive}"


UNIT_SECONDS = 1.0  # how long each unit of the in-process Ctrl-C test sleeps


def test_ctrl_c_while_units_run_keeps_the_finished_ones_and_the_callers_runtime(ray_session, tmp_path, caplog):
    """SIGINT while ``run_units`` waits for Ray: no KeyboardInterrupt inside Ray's calls; the units finished are
    cached, the previous SIGINT handler is back, and a runtime the caller started (here the session's) is left
    running."""
    units = plan_units(["L0H0", "full"], 4, 1, 0, 1, {"test": "ctrl-c"})  # 8 units, 2 at a time on 2 CPUs
    store, previous = UnitStore(tmp_path), signal.getsignal(signal.SIGINT)

    def sleepy(unit, shared, on_progress):
        time.sleep(shared["seconds"])
        return {(c, k): {"sum_g": np.array(float(k))} for c in unit.components for k in unit.chains}

    def ctrl_c_once_a_unit_is_cached() -> None:
        while not any(store.get(u.key) is not None for u in units):
            time.sleep(POLL_S)
        if signal.getsignal(signal.SIGINT) is not previous:  # run_units' deferring handler, never pytest's own
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_once_a_unit_is_cached, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_units(units, sleepy, {"seconds": UNIT_SECONDS}, ClusterConfig(address="local"), store)
    assert signal.getsignal(signal.SIGINT) is previous
    cached = sum(store.get(u.key) is not None for u in units)
    assert 0 < cached < len(units) and f"interrupted: {cached} of {len(units)} units" in caplog.text
    assert ray_session.is_initialized() and ray_session.get(ray_session.remote(lambda: 1).remote()) == 1


# Ctrl-C at any moment of a study on its local Ray runtime: a real study in a subprocess, SIGINT at three
# moments, each a line of its log plus a delay. Four study processes on one CPU each: about 60 s on two idle cores,
# 90 s on busy ones.
INTERRUPT_AT = [("work units: 0 cached", 0.5),  # Ray starting (the pre-flight's runtime)
                ("Ray cluster:", 0.3),  # the first unit submitted, its worker starting
                (r"chains \[0\] shard 0 finished", 0.2)]  # the study's units under way
INTERRUPTIBLE_STUDY = ["cluster=local", "cluster.num_cpus=1", "sampler.n_chains=2", "sampler.n_draws=40",
                       "sampler.batch_size=4", "data.sgld_contexts=32", "data.observable_contexts=4", "data.seq_len=8",
                       "perturbation=synthetic", "perturbation.contexts_per_probe=2", "units.components_per_unit=2",
                       "report=false", "head_roles.n_seqs=2", "head_roles.half_len=6"]
STUDY_TIMEOUT_S = 180  # one study process, start to exit
LEFTOVER_GRACE_S = 5.0  # a process of the study's runtime still alive this long after the study exited is left over


class ProcessTree:
    """Every process that was ever below ``root`` (polled every POLL_S while it runs), plus any whose command line
    names ``marker`` (the runtime's temp dir): what must be gone once the study has exited."""

    def __init__(self, root: subprocess.Popen, marker: str):
        self.root, self.marker, self.seen = root, marker, set()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while self.root.poll() is None:
            try:
                below = psutil.Process(self.root.pid).children(recursive=True)
                self.seen.update((p.pid, p.create_time()) for p in below)
            except psutil.Error:
                pass
            time.sleep(POLL_S)

    def alive(self) -> list[psutil.Process]:
        """Processes of the tree (or naming the marker) that still run, zombies aside."""
        found = []
        for proc in psutil.process_iter(["pid", "create_time", "cmdline", "status"]):
            mine = (proc.info["pid"], proc.info["create_time"]) in self.seen or \
                self.marker in " ".join(proc.info["cmdline"] or [])
            if mine and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
                found.append(proc)
        return found

    def leftovers(self) -> list[str]:
        """What is still alive LEFTOVER_GRACE_S after the root exited (then killed, so the machine stays clean)."""
        deadline = time.monotonic() + LEFTOVER_GRACE_S
        while (alive := self.alive()) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        described = [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}" for p in alive]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return described


def _default_sigint() -> None:
    """SIGINT as in a terminal: a test run in the background (CI, `cmd &`) inherits SIGINT ignored, and so would
    the study, which rightly leaves an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_study(overrides: list[str], ray_tmp: str,
              interrupt_at: tuple[str, float] | None = None) -> tuple[int, str, list]:
    """``python -m workflows.study`` with ``overrides``, its Ray session under ``ray_tmp``; with ``interrupt_at``
    (a regex of its log, a delay), SIGINT once that line has appeared. Returns the exit status, the output and the
    processes left over."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    study = subprocess.Popen([sys.executable, "-m", "workflows.study", *overrides], cwd=ray_tmp, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
    tree, lines, sent = ProcessTree(study, ray_tmp), [], False
    killer = threading.Timer(STUDY_TIMEOUT_S, study.kill)
    killer.start()
    try:
        for line in study.stdout:
            lines.append(line)
            if interrupt_at and not sent and re.search(interrupt_at[0], line):
                time.sleep(interrupt_at[1])
                study.send_signal(signal.SIGINT)
                sent = True
        status = study.wait()
    finally:
        killer.cancel()
    output = "".join(lines)
    assert not interrupt_at or sent, f"no line matching {interrupt_at[0]!r} before the study ended:\n{output[-3000:]}"
    return status, output, tree.leftovers()


def test_ctrl_c_at_any_moment_stops_cleanly_and_the_rerun_resumes(tmp_path, tiny_checkpoint, corpus_dir):
    """SIGINT during Ray's start-up, as the first unit starts and while units run: each time the study exits
    non-zero with the "interrupted" message (no abort in Ray's C++ core), nothing of its Ray session is left
    running, and the cache stays sound: the rerun completes, reusing every unit cached by then."""
    ray_tmp = tempfile.mkdtemp(prefix="susc-sigint-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    cache = tmp_path / "cache"
    overrides = [f"model.checkpoint={tiny_checkpoint}", f"data.corpus_dir={corpus_dir}", f"cache_dir={cache}",
                 *INTERRUPTIBLE_STUDY]
    try:
        for i, moment in enumerate(INTERRUPT_AT):
            status, output, left = run_study([*overrides, f"hydra.run.dir={tmp_path / f'run{i}'}"], ray_tmp, moment)
            assert status != 0 and "Check failed" not in output and "core dumped" not in output, output[-3000:]
            for said in ("Ctrl-C: shutting Ray down", "interrupted:", "rerun the same command"):
                assert said in output, f"interrupted at {moment}, the log lacks {said!r}:\n{output[-3000:]}"
            assert not left, f"interrupted at {moment}: processes of the study's Ray session left running: {left}"
        cached = len(list(cache.glob("*.npz")))
        status, output, left = run_study([*overrides, f"hydra.run.dir={tmp_path / 'rerun'}"], ray_tmp)
        assert status == 0, output[-3000:]
        reused = sum(int(n) for n in re.findall(r"\d+ work units: (\d+) cached", output))
        assert cached > 0 and reused == cached, (cached, reused)
        assert not (cache / "corrupt").exists() and not left
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


DRAW_SECONDS = 1.0  # the progress test's units sleep this long per draw


def test_units_reporting_draws_outlive_the_wait_timeout_and_silent_ones_do_not(ray_session, tmp_path, caplog):
    """The wait for units goes by their progress: units that take longer than ``cluster.wait_timeout_s`` but report
    a draw more often than that finish (with the progress and time left logged); units reporting nothing for
    longer than it end in the TimeoutError that names the setting."""
    def drawing(unit, shared, on_progress):
        for draw in range(1, shared["draws"] + 1):
            time.sleep(DRAW_SECONDS)
            if shared["report"]:
                on_progress(draw, shared["draws"])
        return {(c, k): {"sum_g": np.array(float(k))} for c in unit.components for k in unit.chains}

    units = plan_units(["L0H0", "full"], 1, 1, 1, 1, {"test": "progress"})  # 2 units, one per CPU
    reporting = ClusterConfig(address="local", wait_timeout_s=7 * DRAW_SECONDS, progress_interval_s=0.0,
                              progress_log_s=0.0, interrupt_poll_s=POLL_S)  # above a worker's start, below a unit
    with caplog.at_level("INFO", logger="progress"):
        report = run_units(units, drawing, {"report": True, "draws": 10}, reporting, UnitStore(tmp_path / "reporting"))
    assert report.computed == 2
    assert re.search(r"units: 0\.\d\d of 2 done \(2 in flight\); time left ~\d+\.\d min", caplog.text), caplog.text
    silent = dataclasses.replace(reporting, wait_timeout_s=2 * DRAW_SECONDS)
    with pytest.raises(TimeoutError, match=r"no unit finished or reported a draw in 2\.0 s: .*raise cluster\.wait_timeout_s"):
        run_units(units, drawing, {"report": False, "draws": 4}, silent, UnitStore(tmp_path / "silent"))


def test_a_failing_progress_board_is_no_news_and_said_once(ray_session, caplog):
    """Progress is never worth a study: a board whose reads fail gives no snapshot, and the warning comes once."""
    from workflows.execute import _BoardReader

    @ray_session.remote(num_cpus=0)
    class Broken:
        def snapshot(self):
            raise RuntimeError("board lost")

    reader = _BoardReader(Broken.remote())
    with caplog.at_level(logging.WARNING, logger="execute"):
        polls = []
        deadline = time.monotonic() + 30
        while len(polls) < 3 and time.monotonic() < deadline:  # three answered reads, each a failure
            ready, _ = ray_session.wait([reader.request], timeout=POLL_S)
            if ready:
                polls.append(reader.poll())
    assert polls == [None, None, None]
    assert caplog.text.count("progress board unavailable") == 1
