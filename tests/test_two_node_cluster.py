"""A real two-node Ray cluster on this machine: ``ray start --head`` plus a second ``ray start`` node, both on
loopback with one CPU each, the second advertising a custom resource. A study attached to it (``cluster=attach
cluster.address=...``) and one submitted with ``ray job submit`` (``cluster=attach``, address auto) each lose the
second node mid-study: once it has finished a unit and is computing another, its raylet is killed. Ray re-runs the
lost unit on the head (``cluster.max_retries``; Ray's task records show the failed attempt, NODE_DIED, and the
retry), the study completes, and its tables are bitwise equal to a local run's. Three studies and three node
starts: about 75 s on two idle cores, 90 s on busy ones. cluster/README.md ("Two nodes on one machine") gives the
same procedure by hand."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SECOND_NODE_RESOURCE = "second_node"  # the custom resource the second node advertises (and is found by)
STUDY = ["cluster.task_gpus=0", "sampler.n_chains=8", "sampler.n_draws=40", "sampler.batch_size=4",
         "data.sgld_contexts=32", "data.observable_contexts=4", "data.seq_len=8", "perturbation=synthetic",
         "perturbation.contexts_per_probe=2", "units.components_per_unit=2", "report=false", "head_roles.n_seqs=2",
         "head_roles.half_len=6"]  # 24 units and the pre-flight, ~0.5 s each: time for the second node to start
TABLES = ("response_matrix", "token_susceptibilities", "diagnostics")
UNIT_LINE = re.compile(r"unit (.+?) finished on \S+ \(Ray node (\w+), pid \d+\)")
UNIT_TASK = "_run_with_info"  # a unit's Ray task (workflows/execute.py); a worker computing one is titled ray::NAME
NODE_START_TIMEOUT_S = 120  # a `ray start` that has not said "Ray runtime started." by then has failed
STUDY_TIMEOUT_S = 300  # one study, start to finish
STOP_TIMEOUT_S = 30  # a node's processes are gone this long after its `ray start --block` is stopped or its raylet dies
POLL_S = 0.1
# the head's health checks of the other nodes: a dead node noticed in about 1 s x 3 (Ray's defaults, 3 s x 5, would
# hold the lost unit's retry back by about 15 s)
HEALTH_CHECKS = '{"health_check_period_ms": 1000, "health_check_failure_threshold": 3}'


_HANDED_OUT: set[int] = set()  # ports already given to a Ray component of this test


def free_port() -> int:
    """A TCP port nothing listens on just now (Ray binds it moments later) and not handed out before: the
    kernel may offer a port again once its probe socket is closed, and Ray refuses one port for two components."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def node_ports(ray_tmp: Path) -> list[str]:
    """`ray start` options that keep a node off Ray's default ports (another Ray may run on this machine) and put
    its files under ``ray_tmp``."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", f"--temp-dir={ray_tmp}"]


class Node:
    """One ``ray start --block`` node on loopback with one CPU: the `ray start` process is the parent of all the
    node's processes; a SIGTERM to it drains the node and stops them, and it stops them too when one dies."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.process = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                         "--disable-usage-stats", *args], env=env, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"`ray start {' '.join(args)}` did not start:\n{log.read_text()[-3000:]}")
            time.sleep(POLL_S)

    def processes(self) -> list[psutil.Process]:
        """The node's processes now (raylet, agents, workers)."""
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_raylet(self) -> None:
        """The node dies: its raylet gets SIGKILL, and `ray start --block` takes the rest down."""
        raylets = [p for p in self.processes() if p.name() == "raylet"]
        assert raylets, f"no raylet under the node's process {self.process.pid}"
        for raylet in raylets:
            raylet.kill()
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> list[str]:
        """Stop the node; returns what of it still ran STOP_TIMEOUT_S later (then killed)."""
        tree = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=STOP_TIMEOUT_S)
        if self.process.poll() is None:
            self.process.kill()
        left = []
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {proc.name()}")
                proc.kill()
        return left


class SecondNodeKiller:
    """Follows a study's log as it is written (``study.log`` in its run folder) and watches the second node: once
    that node has finished a unit and is computing another (a worker titled ray::_run_with_info), kills it, so the
    unit it was computing must be retried on the head. Records on which Ray node each unit finished."""

    def __init__(self, node: Node, node_id: str, study_log: Path):
        self.node, self.node_id, self.study_log, self.killed = node, node_id, study_log, False
        self.units: list[tuple[str, str, bool]] = []  # (unit, Ray node id, finished after the kill)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        read = 0
        while True:
            last = self.done.is_set()  # the study has ended: one last read
            text = self.study_log.read_text() if self.study_log.exists() else ""
            complete = text[:text.rfind("\n") + 1]
            for line in complete[read:].splitlines():
                if match := UNIT_LINE.search(line):
                    self.units.append((match.group(1), match.group(2), self.killed))
            read = len(complete)
            if last:
                return
            if not self.killed and self.on_second() and self._computing():
                self.node.kill_raylet()
                self.killed = True
            time.sleep(POLL_S)

    def on_second(self) -> int:
        """Units finished on the second node so far."""
        return sum(node == self.node_id for _, node, _ in self.units)

    def _computing(self) -> bool:
        for proc in self.node.processes():
            try:
                if " ".join(proc.cmdline()).startswith(f"ray::{UNIT_TASK}"):
                    return True
            except psutil.Error:
                pass
        return False

    def finish(self) -> dict[str, int]:
        """Stop following (after one last read); units finished per node."""
        self.done.set()
        self.thread.join()
        return {"second": self.on_second(), "head": len(self.units) - self.on_second(),
                "after_the_kill": sum(after for *_, after in self.units)}


def run(command: list[str], env: dict, cwd: Path) -> tuple[int, str]:
    """Run ``command`` to its end (at most STUDY_TIMEOUT_S); its exit status and output."""
    try:
        done = subprocess.run(command, env=env, cwd=cwd, text=True, capture_output=True, timeout=STUDY_TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        return -1, f"timed out after {STUDY_TIMEOUT_S} s:\n{timeout.stdout}\n{timeout.stderr}"
    return done.returncode, done.stdout + done.stderr


def second_node_id(dashboard: str) -> str:
    """The id of the alive node that advertises SECOND_NODE_RESOURCE (Ray's state API, through the dashboard)."""
    from ray.util.state import list_nodes

    ids = [n.node_id for n in list_nodes(address=dashboard, detail=True)
           if n.state == "ALIVE" and SECOND_NODE_RESOURCE in n.resources_total]
    assert len(ids) == 1, f"expected one alive node with the resource {SECOND_NODE_RESOURCE}, found {ids}"
    return ids[0]


def unit_attempts(dashboard: str) -> dict[str, list[tuple[int, str, str | None, str | None]]]:
    """Every attempt of every unit task the cluster ran, by Ray job: (attempt, state, node id, error type)."""
    from ray.util.state import list_tasks

    jobs: dict[str, list] = {}
    for task in list_tasks(address=dashboard, filters=[("name", "=", UNIT_TASK)], limit=10_000, detail=True,
                           raise_on_missing_output=False):
        jobs.setdefault(task.job_id, []).append((task.attempt_number, task.state, task.node_id, task.error_type))
    return jobs


def assert_retried_after_losing(node_id: str, attempts: list) -> None:
    """A unit's attempt on ``node_id`` failed with the node (NODE_DIED) and a later attempt finished elsewhere."""
    assert any(a == 0 and s == "FAILED" and n == node_id and e == "NODE_DIED" for a, s, n, e in attempts), attempts
    assert any(a >= 1 and s == "FINISHED" and n != node_id for a, s, n, e in attempts), attempts


def tables(run_dir: Path) -> dict:
    return {name: pq.read_table(run_dir / f"{name}.parquet").to_pandas() for name in TABLES}


def assert_same_tables(run_dir: Path, expected: dict, what: str) -> None:
    for name, table in tables(run_dir).items():
        assert table.equals(expected[name]), f"{name}: the {what} differs from the local run"


@pytest.fixture
def cluster_env():
    """The environment of the nodes, studies and job client: the project importable, Ray's files in a short temp dir
    (socket paths must fit 107 bytes), no RAY_ADDRESS from outside, Ray's auth as the tests set it (disabled)."""
    ray_tmp = tempfile.mkdtemp(prefix="susc-2node-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    yield env, Path(ray_tmp)
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_study_survives_losing_the_second_node_attached_and_as_a_job(tmp_path, tiny_checkpoint, corpus_dir,
                                                                        cluster_env):
    env, ray_tmp = cluster_env
    study = [sys.executable, "-m", "workflows.study", f"model.checkpoint={tiny_checkpoint}",
             f"data.corpus_dir={corpus_dir}", *STUDY]
    start, timings, units = time.monotonic(), {}, {}
    local_log = tmp_path / "local.log"
    local = subprocess.Popen([*study, "cluster=inprocess", f"cache_dir={tmp_path / 'local_cache'}",
                              f"hydra.run.dir={tmp_path / 'local'}"], env=env, cwd=tmp_path,
                             stdout=local_log.open("w"), stderr=subprocess.STDOUT)  # runs while the cluster starts
    gcs, dashboard = free_port(), free_port()
    api = f"http://127.0.0.1:{dashboard}"
    second = [f"--address=127.0.0.1:{gcs}", f'--resources={{"{SECOND_NODE_RESOURCE}": 1}}', *node_ports(ray_tmp)]
    nodes: list[Node] = []
    try:
        nodes.append(Node(["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                           f"--dashboard-port={dashboard}", f"--ray-client-server-port={free_port()}",
                           f"--system-config={HEALTH_CHECKS}", *node_ports(ray_tmp)], env, tmp_path / "head.log"))
        nodes.append(Node(second, env, tmp_path / "second_1.log"))
        assert local.wait(timeout=STUDY_TIMEOUT_S) == 0, local_log.read_text()[-3000:]
        expected = tables(tmp_path / "local")
        timings["cluster_and_local_run"] = time.monotonic() - start

        start = time.monotonic()
        killer = SecondNodeKiller(nodes[-1], second_node_id(api), tmp_path / "attach" / "study.log")
        status, output = run([*study, "cluster=attach", f"cluster.address=127.0.0.1:{gcs}",
                              f"cache_dir={tmp_path / 'attach_cache'}", f"hydra.run.dir={tmp_path / 'attach'}"],
                             env, tmp_path)
        timings["attached"], units["attached"] = time.monotonic() - start, killer.finish()
        assert status == 0, output[-3000:]
        assert killer.killed, f"the second node was never killed mid-study: {units}, {killer.units}"
        assert_same_tables(tmp_path / "attach", expected, "attached study")
        attempts = unit_attempts(api)
        (attached_job,) = attempts
        assert_retried_after_losing(killer.node_id, attempts[attached_job])

        start = time.monotonic()
        nodes.append(Node(second, env, tmp_path / "second_2.log"))
        killer = SecondNodeKiller(nodes[-1], second_node_id(api), tmp_path / "job" / "study.log")
        status, output = run([RAY, "job", "submit", f"--address={api}", "--", *study, "cluster=attach",
                              f"cache_dir={tmp_path / 'job_cache'}", f"hydra.run.dir={tmp_path / 'job'}"],
                             env, tmp_path)
        timings["job"], units["job"] = time.monotonic() - start, killer.finish()
        assert status == 0 and "succeeded" in output, output[-3000:]
        assert killer.killed, f"the second node was never killed mid-study: {units}, {killer.units}"
        assert_same_tables(tmp_path / "job", expected, "Ray job's study")
        attempts = unit_attempts(api)
        (job,) = set(attempts) - {attached_job}
        assert_retried_after_losing(killer.node_id, attempts[job])
    finally:
        local.kill()  # already finished, unless something failed before it did
        left = [p for node in reversed(nodes) for p in node.stop()]
    print("two-node cluster: seconds", {k: round(v, 1) for k, v in timings.items()}, "units finished per node", units)
    assert not left, f"processes of the two-node cluster left running: {left}"
