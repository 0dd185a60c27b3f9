"""Small edge helpers shared by the Hydra apps: device choice, bundled asset paths, logging setup, Ctrl-C."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from omegaconf import OmegaConf

ASSETS = Path(__file__).resolve().parent.parent / "susc_core" / "assets"


def asset_path(name: str) -> str:
    """Absolute path of a file bundled in ``susc_core/assets`` (the default model and tokenizer)."""
    return str(ASSETS / name)


def register_resolvers() -> None:
    """``${asset:NAME}`` in configs points at a bundled asset; ``${pid:}`` is this process's id (run folders
    carry it, so that two studies started in the same second never share one). Idempotent."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), use_cache=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` are taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} requested but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    return logger


def authenticate_local_runtime(token_bytes: int) -> str:
    """Token authentication for a private local Ray runtime: unless ``RAY_AUTH_MODE`` is set already, set
    ``RAY_AUTH_MODE=token`` and a fresh random ``RAY_AUTH_TOKEN`` (``token_bytes`` random bytes) that only
    this process and the runtime it starts inherit. Ray's servers listen on every interface whatever
    address it is given (measured with Ray 2.60), so the token is what keeps other machines out. Must run
    before ``ray`` is imported (Ray reads the mode at import). Returns the mode in force, for the log."""
    if "RAY_AUTH_MODE" in os.environ:
        return os.environ["RAY_AUTH_MODE"]
    if "ray" in sys.modules:
        get_logger("runtime").warning("ray was imported before the local runtime was configured: it runs without "
                                      "authentication; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN before starting")
        return "disabled"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(token_bytes)
    os.environ["RAY_AUTH_MODE"] = "token"
    return "token (a fresh random token for this run)"


class Interrupt:
    """How many SIGINTs (Ctrl-C) arrived while ``deferred_sigint`` was in force."""

    def __init__(self) -> None:
        self.count = 0

    @property
    def requested(self) -> bool:
        return self.count > 0


@contextmanager
def deferred_sigint() -> Iterator[Interrupt]:
    """While inside, SIGINT (Ctrl-C) only counts in the yielded ``Interrupt``; the code inside polls
    ``requested`` and stops in its own order. Ray's driver calls are not safe to interrupt: with Ray 2.60 a
    KeyboardInterrupt inside ``ray.wait`` (and the forced cancel that followed it) aborted the driver in Ray's
    C++ core now and then (``task_manager.cc ... Check failed``), leaving its runtime behind. The previous handler
    is restored on leaving. Changes nothing outside the main thread (Python delivers signals there only) or
    where SIGINT is ignored (``nohup``, background jobs)."""
    interrupt = Interrupt()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield interrupt
        return

    def count(signum, frame) -> None:
        interrupt.count += 1

    previous = signal.signal(signal.SIGINT, count)
    try:
        yield interrupt
    finally:  # None: a handler installed outside Python, which cannot be put back; Python's own instead
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


PROVENANCE_PACKAGES = ("torch", "ray", "hydra-core", "omegaconf", "numpy", "pyarrow", "transformers",
                       "transformer-lens", "safetensors")
CODE_COMMIT_ENV = "SUSC_CODE_COMMIT"  # set in the cluster image (cluster/Dockerfile), where there is no .git


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(device: str) -> dict:
    """What made a run: the code's commit and whether the tree had uncommitted changes (git, else the image's
    ``SUSC_CODE_COMMIT``), the installed versions of ``PROVENANCE_PACKAGES`` (None when absent), Python, and
    the device with its name."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    resolved = torch.device(device) if device != "auto" else resolve_device(device)
    return {"code_version": commit or os.environ.get(CODE_COMMIT_ENV, "unknown"),
            "code_source": "git" if commit else ("image" if CODE_COMMIT_ENV in os.environ else "unknown"),
            "dirty": bool(status) if status is not None else None,
            "python": sys.version.split()[0], "packages": versions, "device": str(resolved),
            "device_name": torch.cuda.get_device_name(resolved) if resolved.type == "cuda" else _cpu_name()}


def _cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
