"""One owner per run folder: where a run's checkpoints go (``run.storage_path`` roots claimed by
``run.json``), the ``run.lock`` with its heartbeat and stale-lock takeover, and the removal of what a save
killed mid-write leaves behind."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from scoreaction.checkpoint import atomic_write_text
from scoreaction.run_folder.errors import ResumeError, RunLockedError

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
OWNER_FILE = "run.json"
DEFAULT_LEASE_S = 60.0
LEFTOVER_MARKERS = (".staging-", ".tmp-", ".old-", ".stale-")


# --------------------------------------------------------------------------------------------------
# Where a run's checkpoints go
# --------------------------------------------------------------------------------------------------


def _owner_of(root: Path) -> str | None:
    try:
        return json.loads((root / OWNER_FILE).read_text())["output_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_dir_for(cfg, out: str | os.PathLike) -> Path:
    """Where the run's checkpoints go: <output_dir>/checkpoints, or <storage_path>/<run name>/checkpoints
    (a path every node sees) when run.storage_path is set. Two output folders with the same name never share
    a storage folder: the first claims <name> (``run.json``), another gets <name>-<hash of its path>."""
    out = Path(out).expanduser().resolve()
    storage = cfg.run.storage_path
    if not storage:
        return out / "checkpoints"
    if "://" in storage:
        raise ResumeError(
            f"run.storage_path={storage!r}: give a filesystem path that every node mounts (NFS, EFS, a "
            "GCS/S3 fuse mount); URIs are not supported because checkpoints are published with atomic renames"
        )
    base = Path(storage).expanduser().resolve()
    digest = hashlib.sha1(str(out).encode()).hexdigest()[:8]
    plain, hashed = base / out.name, base / f"{out.name}-{digest}"
    for root in (plain, hashed):
        if _owner_of(root) == str(out):
            return root / "checkpoints"
    return (plain if _owner_of(plain) is None else hashed) / "checkpoints"


def claim_root(checkpoint_dir: Path, out: Path) -> None:
    """Record which output folder owns a storage_path root (O_EXCL: the first claim wins)."""
    root = checkpoint_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    path = root / OWNER_FILE
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        owner = _owner_of(root)
        if owner is not None and owner != str(out):
            raise ResumeError(
                f"{str(root)!r} belongs to the run with output folder {owner!r}, not {str(out)!r}; start again "
                "(a free name is picked) or choose another --output-dir"
            ) from None
        if owner is None:  # unreadable: rewrite it
            atomic_write_text(path, json.dumps({"output_dir": str(out)}))
        return
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"output_dir": str(out)}))


# --------------------------------------------------------------------------------------------------
# One owner: the lock
# --------------------------------------------------------------------------------------------------


def _pid_start(pid: int) -> str | None:
    """The start time of a process (Linux /proc), to tell a reused pid from the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _pid_start(pid)
    return start is None or now is None or now == start


def lock_is_stale(record: dict[str, Any] | None, now: float | None = None) -> tuple[bool, str]:
    """(stale, why) for a lock record: on this host the owner's pid must be alive; on another host its
    heartbeat must be younger than its lease."""
    if record is None:
        return True, "unreadable lock file"
    now = time.time() if now is None else now
    if record.get("host") == socket.gethostname():
        pid = int(record.get("pid", -1))
        if pid <= 0 or not _pid_alive(pid, record.get("pid_start")):
            return True, f"pid {pid} no longer runs on this host"
        return False, f"pid {pid} on this host is alive"
    age = now - float(record.get("heartbeat_at", 0))
    lease = float(record.get("lease_s", DEFAULT_LEASE_S))
    if age > lease:
        return True, f"its heartbeat is {age:.0f} s old (lease {lease:.0f} s)"
    return False, f"its heartbeat is {age:.0f} s old (lease {lease:.0f} s)"


def read_lock(root: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads((root / LOCK_FILE).read_text())
        return rec if isinstance(rec, dict) else None
    except (OSError, ValueError):
        return None


class RunLock:
    """Exclusive ownership of a run root (``<root>/run.lock``), refreshed by a heartbeat thread."""

    def __init__(self, root: str | os.PathLike, run_id: str | None = None, lease_s: float = DEFAULT_LEASE_S):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.lease_s = float(lease_s)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()),
            "started_at": now,
            "heartbeat_at": now,
            "lease_s": self.lease_s,
        }

    def acquire(self) -> RunLock:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{LOCK_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(self._record()))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)  # atomic and exclusive, with the whole record in place
                    break
                except FileExistsError:
                    pass
                other = read_lock(self.root)
                stale, why = lock_is_stale(other)
                if not stale:
                    raise _locked(self.root, other, why)
                moved = self.root / f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(self.path, moved)
                except FileNotFoundError:
                    continue
                if read_lock_file(moved) != other:  # a racing job took it over meanwhile: give it back
                    with contextlib.suppress(FileExistsError):
                        os.link(moved, self.path)
                    moved.unlink(missing_ok=True)
                    continue
                moved.unlink(missing_ok=True)
                logger.warning(
                    "taking over the stale lock of %s (run %r, host %r, pid %s): %s",
                    self.root,
                    (other or {}).get("run_id"),
                    (other or {}).get("host"),
                    (other or {}).get("pid"),
                    why,
                )
            else:
                raise RunLockedError(f"could not lock {str(self.root)!r}: other jobs keep taking it")
        finally:
            tmp.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run-lock-heartbeat")
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(max(1.0, self.lease_s / 4)):
            rec = read_lock(self.root)
            if rec is None or rec.get("run_id") != self.run_id:
                self.lost = True
                logger.error("lost the lock of %s to %r: no further checkpoint is published", self.root, rec)
                return
            rec["heartbeat_at"] = time.time()
            with contextlib.suppress(OSError):
                atomic_write_text(self.path, json.dumps(rec))

    def check(self) -> None:
        """Raise unless this job still owns the folder (called before publishing a checkpoint)."""
        verify_owner(self.root, self.run_id)
        if self.lost:
            raise RunLockedError(f"this job lost the lock of {str(self.root)!r}; it publishes nothing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        rec = read_lock(self.root)
        if rec is not None and rec.get("run_id") == self.run_id:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _locked(root: Path, other: dict[str, Any], why: str) -> RunLockedError:
    return RunLockedError(
        f"{str(root)!r} is owned by a live job (run {other.get('run_id')!r}, host {other.get('host')!r}, pid "
        f"{other.get('pid')}; {why}); wait for it to finish or stop it, or choose another --output-dir. "
        f"Nothing was touched. (Lock file: {root / LOCK_FILE})"
    )


def check_not_locked(root: str | os.PathLike) -> None:
    """Raise RunLockedError if a live job owns root (a look only: nothing is written)."""
    rec = read_lock(Path(root))
    if rec is None and not (Path(root) / LOCK_FILE).exists():
        return
    stale, why = lock_is_stale(rec)
    if not stale:
        raise _locked(Path(root), rec, why)


def read_lock_file(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verify_owner(root: str | os.PathLike, run_id: str | None) -> None:
    """Raise RunLockedError if the lock of root names another run: a job that lost its folder (its lock was
    taken over as stale) publishes nothing more. run_id None, or no lock visible here (a learner on another
    node without run.storage_path): no check."""
    if run_id is None or not (Path(root) / LOCK_FILE).exists():
        return
    rec = read_lock(Path(root))
    if rec is not None and rec.get("run_id") != run_id:
        raise RunLockedError(
            f"{str(root)!r} is no longer owned by run {run_id!r} (lock: {rec}); refusing to publish a checkpoint"
        )


# --------------------------------------------------------------------------------------------------
# Leftovers of an interrupted save
# --------------------------------------------------------------------------------------------------


def clean_leftovers(checkpoint_dir: str | os.PathLike) -> list[str]:
    """Remove what a save killed mid-write leaves (hidden staging/old folders, temp files) in the checkpoint
    folder and its root. Only call it while owning the run (no save can be in progress)."""
    removed: list[str] = []
    root = Path(checkpoint_dir)
    for folder in (root, root.parent):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if not (p.name.startswith(".") and any(m in p.name for m in LEFTOVER_MARKERS)):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    if removed:
        logger.warning("removed %d leftovers of an interrupted save in %s: %s", len(removed), root, removed)
    return sorted(removed)
