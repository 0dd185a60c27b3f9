"""Fan work units out as Ray tasks (or run them in this process) and keep every finished unit.

Units already in the store are skipped, so an interrupted or repeated study recomputes only what is
missing. Each finished unit is written to the store the moment it arrives, so Ctrl-C loses nothing
finished; while units run on Ray, Ctrl-C is deferred and handled in order (keep the units that finished, shut
down the Ray connection made here, which ends those in flight). ``ray.remote`` appears only here.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm import tqdm

from susc_core.engine.chains import OnProgress
from workflows.plan import WorkUnit
from workflows.progress import Board, Reporter, View, sender
from workflows.runtime import Interrupt, authenticate_local_runtime, deferred_sigint, get_logger
from workflows.unit_store import UnitStats, UnitStore

log = get_logger("execute")

Task = Callable[[WorkUnit, dict, OnProgress], UnitStats]  # (unit, shared, on_progress) -> statistics
_CONNECTED_HERE: list[bool] = [False]  # whether init_ray made this process's Ray connection (then it may end it)


@dataclass
class ClusterConfig:
    """Where and how units run."""

    executor: str = "ray"  # ray | inprocess (same code path without Ray, for debugging and tests)
    address: str = "local"  # local: private runtime on this machine; auto or ray://host:port: attach
    num_cpus: int | None = None  # size of a local runtime (None: every core of this machine)
    num_gpus: int | None = None  # GPUs a local runtime advertises (None: those torch sees)
    object_store_memory_mb: int = 512  # local runtime's object store
    task_cpus: float = 1.0  # CPUs reserved per unit (also the unit's torch threads)
    task_gpus: float = 0.0  # GPU fraction reserved per unit (e.g. 0.25 packs four units per GPU)
    max_in_flight: int = 0  # cap on submitted, unfinished units; 0: twice the cluster's slots
    max_retries: int = 3  # Ray re-runs a unit whose worker process died
    wait_timeout_s: float = 600.0  # no unit finishing or reporting a draw for this long: the request cannot be scheduled
    progress_interval_s: float = 5.0  # a unit reports its draws to the driver at most this often
    progress_log_s: float = 60.0  # the driver logs the units' progress and the time left this often
    interrupt_poll_s: float = 0.5  # how often the wait for units looks for a Ctrl-C (SIGINT is deferred while on Ray)
    claim_poll_s: float = 2.0  # how often to look for units another study on the same cache is computing
    claim_stale_s: float = 3600.0  # another host's claim on a unit not refreshed for this long is taken over
    auth_token_bytes: int = 32  # random bytes of the local runtime's token (unless RAY_AUTH_MODE is set)
    kill_worker_once_dir: str | None = None  # fault injection for tests: one worker dies mid-study (marker file here)
    runtime_env: dict = field(default_factory=dict)  # Ray runtime_env for attached clusters (working_dir, pip ...)


@dataclass
class RunReport:
    """What happened to the units of one study."""

    total: int
    cached: int
    computed: int
    seconds: float
    where: dict[str, int]  # "host:device" -> units computed there
    peak_rss_mib: float  # largest peak RSS of a process that computed a unit (NaN if none was computed)
    peak_cuda_mib: float  # largest CUDA peak allocation of a unit (NaN without CUDA)
    stats: dict[str, UnitStats]  # unit key -> its statistics (as verified in the store, or as just computed and saved)


def _run_with_info(task: Task, unit: WorkUnit, shared: dict, threads: int, kill_dir: str | None, sink,
                   interval_s: float) -> tuple[UnitStats, dict]:
    """Run one unit; returns its statistics and where/how long it ran, with the process's peak memory. Its draws
    are reported to ``sink`` (``progress.sender``) at most every ``interval_s`` seconds."""
    on_progress = Reporter(sender(sink), unit.key, interval_s)
    on_progress(0, 0)  # started: a sign of life before torch is imported and the first draw is taken
    import torch

    from susc_core.engine.memory import peak_memory_mib, reset_peak_memory

    if kill_dir is not None:
        try:  # the first unit to get here claims the marker and takes its worker down
            os.close(os.open(os.path.join(kill_dir, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os._exit(1)
        except FileExistsError:
            pass
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # same thread count in and out of Ray: bitwise-equal reductions
    if torch.cuda.is_available():
        reset_peak_memory("cuda")
    start = time.perf_counter()
    try:
        stats = task(unit, shared, on_progress)
    finally:
        torch.set_num_threads(previous)
    return stats, {"host": socket.gethostname(), "node": _ray_node_id(), "pid": os.getpid(),
                   "seconds": time.perf_counter() - start,
                   "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "peak_rss_mib": peak_memory_mib("cpu"),
                   "peak_cuda_mib": peak_memory_mib("cuda") if torch.cuda.is_available() else float("nan")}


def _ray_node_id() -> str | None:
    """The id of the Ray node this process is part of (None without Ray): several nodes may share a host."""
    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def init_ray(cluster: ClusterConfig) -> dict:
    """Start a private local runtime (token-authenticated, ``authenticate_local_runtime``) or attach to
    ``cluster.address``; returns the cluster's resources."""
    if cluster.address == "local" and "ray" not in sys.modules:
        log.info("local Ray runtime, authentication: %s", authenticate_local_runtime(cluster.auth_token_bytes))
    import ray

    if not ray.is_initialized():
        if cluster.address == "local":
            ray.init(address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                     include_dashboard=False, object_store_memory=cluster.object_store_memory_mb * 2**20,
                     logging_level="WARNING", log_to_driver=False)
        else:
            ray.init(address=cluster.address, runtime_env=cluster.runtime_env or None, logging_level="WARNING")
        _CONNECTED_HERE[0] = True
    resources = ray.cluster_resources()
    log.info("Ray cluster: %s CPUs, %s GPUs on %d nodes", resources.get("CPU", 0), resources.get("GPU", 0),
             len([n for n in ray.nodes() if n.get("Alive")]))
    if cluster.address == "local":
        if cluster.task_gpus > resources.get("GPU", 0):
            raise ValueError(f"cluster.task_gpus={cluster.task_gpus} but the local Ray runtime has "
                             f"{resources.get('GPU', 0)} GPUs; set cluster.task_gpus=0 or run on a GPU machine")
        if cluster.task_cpus > resources.get("CPU", 0):
            raise ValueError(f"cluster.task_cpus={cluster.task_cpus} exceeds the local runtime's "
                             f"{resources.get('CPU', 0)} CPUs; lower cluster.task_cpus")
    return resources


def run_units(units: list[WorkUnit], task: Task, shared: dict, cluster: ClusterConfig, store: UnitStore) -> RunReport:
    """Compute every unit missing from ``store``; finished units are saved as they arrive. Returns the
    statistics of every unit with the report, each cached file read once (verified) and each computed unit
    handed over as computed, so the caller never reads the store again.

    Units are claimed first (``UnitStore.claim``): those another study on the same cache is computing are
    waited for, polled every ``cluster.claim_poll_s``, and taken over if their claim goes stale."""
    start = time.perf_counter()
    done: dict[str, UnitStats] = {}
    for unit in units:
        if (cached := store.get(unit.key)) is not None:
            done[unit.key] = cached
    todo = [u for u in units if u.key not in done]
    log.info("%d work units: %d cached in %s, %d to compute (executor=%s)",
             len(units), len(units) - len(todo), store.root, len(todo), cluster.executor)
    where: dict[str, int] = {}
    peaks: list[tuple[float, float]] = []  # (RSS, CUDA) of every computed unit
    bar = tqdm(total=len(units), initial=len(units) - len(todo), desc="units", unit="unit", dynamic_ncols=True,
               file=sys.stderr, bar_format="{l_bar}{bar}| {n:.2f}/{total} [{elapsed}<{remaining}]")
    view = View(bar, cluster.progress_log_s)
    claimed: set[str] = set()

    def finish(unit: WorkUnit, stats: UnitStats, info: dict) -> None:
        store.save(unit.key, stats)
        # copies: arrays from Ray are read-only views that would pin its object store
        done[unit.key] = {chain: {name: np.array(value) for name, value in fields.items()}
                          for chain, fields in stats.items()}
        store.release(unit.key)
        claimed.discard(unit.key)
        store.refresh(claimed)
        place = f"{info['host']}:{info['device']}"
        where[place] = where.get(place, 0) + 1
        peaks.append((info["peak_rss_mib"], info["peak_cuda_mib"]))
        node = f"Ray node {info['node']}, " if info["node"] else ""
        log.info("unit %s finished on %s (%spid %d) in %.1f s; peak RSS of the process %.0f MiB", unit.label(), place,
                 node, info["pid"], info["seconds"], info["peak_rss_mib"])
        view.unit_done(unit.key)

    def claim(candidates: list[WorkUnit]) -> tuple[list[WorkUnit], list[WorkUnit]]:
        mine, others = [], []
        for unit in candidates:  # not in the store when last looked at
            if store.claim(unit.key):
                if (cached := store.get(unit.key)) is None:  # not finished by another study before the claim
                    claimed.add(unit.key)
                    mine.append(unit)
                    continue
                store.release(unit.key)
                done[unit.key] = cached
                view.unit_done(unit.key)
            elif (cached := store.get(unit.key)) is not None:  # finished by the study that held it
                done[unit.key] = cached
                view.unit_done(unit.key)
            else:
                others.append(unit)
        return mine, others

    threads = int(cluster.task_cpus) if cluster.task_cpus >= 1 else 1
    try:
        mine, others = claim(todo)
        while mine or others:
            if others:
                log.info("%d unit(s) are being computed by another study on %s; computing the other %d, then "
                         "waiting for those", len(others), store.root, len(mine))
            if cluster.executor == "inprocess":
                for unit in mine:
                    finish(unit, *_run_with_info(task, unit, shared, threads, None, view.report,
                                                 cluster.progress_interval_s))
            elif cluster.executor == "ray":
                if mine:
                    _run_on_ray(mine, task, shared, cluster, threads, finish, view)
            else:
                raise ValueError(f"cluster.executor={cluster.executor!r}; choose 'ray' or 'inprocess'")
            mine = []
            while others and not mine:
                time.sleep(cluster.claim_poll_s)
                mine, others = claim(others)
    except KeyboardInterrupt:
        log.warning("interrupted: %d of %d units are finished and cached in %s; rerun the same command to "
                    "compute only the rest", len(done), len(units), store.root)
        raise
    finally:
        for key in claimed:
            store.release(key)
        bar.close()
    computed = sum(where.values())
    return RunReport(len(units), len(units) - computed, computed, time.perf_counter() - start, where,
                     _largest(p[0] for p in peaks), _largest(p[1] for p in peaks), done)


def _largest(values) -> float:
    """The largest finite value (NaN when there is none)."""
    return max((v for v in values if math.isfinite(v)), default=float("nan"))


def _run_on_ray(todo: list[WorkUnit], task: Task, shared: dict, cluster: ClusterConfig, threads: int,
                finish: Callable, view: View) -> None:
    """Run ``todo`` as Ray tasks (``_submit_and_collect``), handing each finished unit to ``finish``.

    Ctrl-C (SIGINT) is deferred for the whole of it, Ray's start-up included (``deferred_sigint``): the wait loop
    notices it within ``cluster.interrupt_poll_s``, units already finished are kept, the Ray connection is shut
    down if ``init_ray`` made it (which ends the units in flight), and KeyboardInterrupt is raised; ``run_units``
    then says what is cached and how to resume. Units in flight are never cancelled (``_leave_in_flight``)."""
    import ray

    with deferred_sigint() as interrupt:
        resources = init_ray(cluster)
        pending: dict = {}
        try:
            if not interrupt.requested:  # Ctrl-C during start-up: nothing submitted yet
                _submit_and_collect(todo, task, shared, cluster, threads, finish, resources, pending, interrupt, view)
        except BaseException:
            _leave_in_flight(pending, finish)
            raise
        if interrupt.requested:
            _leave_in_flight(pending, finish)
            log.warning("Ctrl-C: %s", "shutting Ray down" if _CONNECTED_HERE[0]
                        else "the caller's Ray runtime stays up")
            if _CONNECTED_HERE[0]:  # a runtime (or connection) the caller made is the caller's to end
                ray.shutdown()
                _CONNECTED_HERE[0] = False
            raise KeyboardInterrupt


def _submit_and_collect(todo: list[WorkUnit], task: Task, shared: dict, cluster: ClusterConfig, threads: int,
                        finish: Callable, resources: dict, pending: dict, interrupt: Interrupt, view: View) -> None:
    """Submit units, keeping at most twice the cluster's slots (or ``cluster.max_in_flight``) in flight, and
    finish each as it arrives; returns when all are done or a Ctrl-C is requested. ``pending`` (ref -> unit)
    holds the units in flight on return. The units report their draws to a ``progress.Board`` actor, which
    ``view`` reads while waiting."""
    import ray

    slots = max(1, int(resources.get("CPU", 1) // max(cluster.task_cpus, 1e-9)))
    cap = cluster.max_in_flight or 2 * slots
    shared_ref = ray.put(shared)  # weights and contexts go into the object store once
    board = _BoardReader(_start_board())
    remote = ray.remote(_run_with_info).options(num_cpus=cluster.task_cpus, num_gpus=cluster.task_gpus,
                                                max_retries=cluster.max_retries, num_returns=1)
    queue = list(todo)
    while (queue or pending) and not interrupt.requested:
        while queue and len(pending) < cap:
            unit = queue.pop(0)
            pending[remote.remote(task, unit, shared_ref, threads, cluster.kill_worker_once_dir, board.actor,
                                  cluster.progress_interval_s)] = unit
        for ref in _wait_for_one(pending, cluster, interrupt, view, board):
            finish(pending.pop(ref), *ray.get(ref))


def _start_board():
    """The units' ``progress.Board`` actor: no CPU, on the driver's node when it can be (a study that loses its
    driver's node is over anyway), restarted empty by Ray if its node goes (the units' next reports refill it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(Board).options(num_cpus=0, max_restarts=-1, scheduling_strategy=here).remote()


class _BoardReader:
    """The driver's reads of the units' ``progress.Board`` actor without waiting on it: one snapshot request in
    flight at a time, taken when ready (the actor's own start-up never holds up the wait for units). Progress is
    never worth a study: a failed read counts as no news."""

    def __init__(self, actor):
        self.actor, self.request = actor, actor.snapshot.remote()
        self.warned = False  # a board that stays down is reported once, not every poll

    def poll(self) -> dict | None:
        """The newest snapshot if one has arrived since the last call (then a new one is requested), else None."""
        import ray

        ready, _ = ray.wait([self.request], timeout=0)
        if not ready:
            return None
        try:
            snapshot = ray.get(self.request)
        except ray.exceptions.RayError as error:  # the board's node went; Ray restarts it
            if not self.warned:
                log.warning("progress board unavailable (%s); the units' next reports refill it once Ray has "
                            "restarted it", type(error).__name__)
            self.warned = True
            snapshot = None
        self.request = self.actor.snapshot.remote()
        return snapshot


def _wait_for_one(pending: dict, cluster: ClusterConfig, interrupt: Interrupt, view: View,
                  board: _BoardReader) -> list:
    """The refs of ``pending`` that are ready once at least one is, looking for a Ctrl-C and reading the units'
    progress from ``board`` into ``view`` every ``cluster.interrupt_poll_s`` (an empty list when a Ctrl-C came).
    No unit finishing or reporting a draw within ``cluster.wait_timeout_s`` is a TimeoutError."""
    import ray

    while not interrupt.requested:
        if (snapshot := board.poll()) is not None:
            view.update(snapshot)
        left = view.last_change + cluster.wait_timeout_s - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no unit finished or reported a draw in {cluster.wait_timeout_s} s: either the cluster "
                               f"lacks the requested resources (task_cpus={cluster.task_cpus}, task_gpus="
                               f"{cluster.task_gpus}) or a draw takes longer than that (raise cluster.wait_timeout_s, "
                               f"or split units with units.components_per_unit / units.probe_shards); finished units "
                               f"are cached")
        done, _ = ray.wait(list(pending), num_returns=1, timeout=min(cluster.interrupt_poll_s, left))
        if done:
            return done
    return []


def _leave_in_flight(pending: dict, finish: Callable) -> None:
    """Keep the units of ``pending`` that have finished (``finish``) and leave the others to run out or to end with
    the runtime. Nothing is cancelled: with Ray 2.60, ``ray.cancel`` (forced or not) of a task that is just
    finishing aborts the driver in Ray's C++ core now and then (``task_manager.cc ... Tried to complete task that
    was not pending``, measured), whereas shutting the runtime down with tasks in flight is safe."""
    import ray

    done, left = ray.wait(list(pending), num_returns=len(pending), timeout=0) if pending else ([], [])
    for ref in done:
        try:
            result = ray.get(ref)
        except ray.exceptions.RayError as error:  # the study is stopping anyway: say so, keep going
            log.warning("unit %s failed: %s", pending[ref].label(), type(error).__name__)
            continue
        finish(pending[ref], *result)
    if left:
        log.warning("%d unit(s) in flight left to finish or to end with the Ray runtime (not cancelled: cancelling a "
                    "finishing task can abort this process in Ray 2.60)", len(left))
    pending.clear()
