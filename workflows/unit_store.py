"""The on-disk cache of finished work units: one ``{key}.npz`` per unit, written atomically, verified on read.

Each file maps ``{component}|{chain}|{field}`` to a numpy array, so it holds the small mergeable
statistics of every (component, chain) the unit ran and nothing else (no pickles), plus the unit's key
and a SHA-256 of its arrays. A file that cannot be read, belongs to another key or fails its checksum is
named in a warning, moved to ``corrupt/`` and counts as missing, so the study recomputes it.

Studies sharing one cache directory claim the units they compute (``{key}.claim``, created exclusively,
holding host and pid): a unit claimed by a live study elsewhere is waited for, not computed twice; a
claim whose process is gone (same host) or that has not been refreshed for ``stale_s`` seconds (another
host) is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import zipfile
from pathlib import Path

import numpy as np

from workflows.runtime import get_logger

log = get_logger("unit_store")
UnitStats = dict[tuple[str, int], dict[str, np.ndarray]]
SEP = "|"
KEY_ENTRY, CHECKSUM_ENTRY = "__key__", "__sha256__"
CORRUPT_DIR = "corrupt"
READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def checksum(flat: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(flat):
        value = np.ascontiguousarray(flat[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class UnitStore:
    """Finished units under ``root``; a unit counts as done once its file exists and verifies.

    stale_s: age (seconds since its last refresh) after which another host's claim is taken over."""

    def __init__(self, root: str | Path, stale_s: float = 3600.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stale_s = stale_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npz"

    def claim_path(self, key: str) -> Path:
        return self.root / f"{key}.claim"

    def save(self, key: str, stats: UnitStats) -> None:
        flat = {SEP.join((comp, str(chain), name)): np.asarray(value)
                for (comp, chain), fields in stats.items() for name, value in fields.items()}
        tmp = self.root / f".{key}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **flat, **{KEY_ENTRY: np.array(key), CHECKSUM_ENTRY: np.array(checksum(flat))})
        tmp.replace(self.path(key))

    def get(self, key: str) -> UnitStats | None:
        """The unit's statistics if a verified file of ``key`` exists, else None (a bad file is moved aside and
        counts as missing: see the module docstring). The file is read whole, once per call."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                flat = {name: data[name] for name in data.files}
            stored_key, stored_sum = str(flat.pop(KEY_ENTRY)), str(flat.pop(CHECKSUM_ENTRY))
        except READ_ERRORS as err:
            return self._move_aside(key, f"unreadable ({type(err).__name__}: {err})")
        if stored_key != key:
            return self._move_aside(key, f"holds unit {stored_key}, not {key} (a file copied over another)")
        if checksum(flat) != stored_sum:
            return self._move_aside(key, "fails its checksum (damaged on disk)")
        out: UnitStats = {}
        for name, value in flat.items():
            comp, chain, field = name.split(SEP)
            out.setdefault((comp, int(chain)), {})[field] = value
        return out

    def _move_aside(self, key: str, why: str) -> None:
        bad = self.root / CORRUPT_DIR / f"{key}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}.npz"
        bad.parent.mkdir(exist_ok=True)
        try:
            self.path(key).replace(bad)
        except FileNotFoundError:  # another study moved it first
            pass
        log.warning("cached unit %s %s: moved to %s; the unit will be recomputed", self.path(key), why, bad)

    def claim(self, key: str) -> bool:
        """Claim ``key`` for this process; False while another live study holds it (a stale claim is taken)."""
        path = self.claim_path(key)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder(path) == self.owner:
                    return True
                if not self._stale(path):
                    return False
                log.warning("taking over the stale claim %s (%s)", path, self._holder(path))
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            return True
        return False

    def refresh(self, keys) -> None:
        """Mark this process's claims on ``keys`` as alive (their files' mtime), for studies on other hosts."""
        for key in keys:
            try:
                os.utime(self.claim_path(key))
            except FileNotFoundError:
                pass

    def release(self, key: str) -> None:
        """Drop this process's claim on ``key`` (never another's)."""
        path = self.claim_path(key)
        if self._holder(path) == self.owner:
            path.unlink(missing_ok=True)

    def _holder(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, path: Path) -> bool:
        holder = self._holder(path)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        if holder is None:  # being written, or garbage: stale only once old
            return age > self.stale_s
        if holder.get("host") == self.owner["host"]:
            return not _process_alive(int(holder.get("pid", -1)))
        return age > self.stale_s
