"""Run folders: one owner, one training-checkpoint format, one ``latest``, for both training backends.

The single-process ``Trainer`` and the distributed learner (``scoreaction.distributed``) write the same
training checkpoints through this module and resume from them the same way.

Layout (``<root>`` is ``run.output_dir``, or ``<run.storage_path>/<run name>`` when storage_path is set)::

    <root>/run.lock                  the owner: run id, host, pid, heartbeat (JSON)
    <root>/run.json                  storage_path runs: which output folder owns this root
    <root>/checkpoints/latest        names the newest complete checkpoint (replaced atomically)
    <root>/checkpoints/step_<N>/     N = epochs done:
        pytorch_lora_weights.safetensors | unet/ | toy_policy.safetensors   the policy
        checkpoint.json                      base model, kind, step, config, metrics
        learner_state.safetensors            every tensor of the training state (optimisers, F_phi, RNGs)
        learner_state.json                   the rest of it (step counts, hyper-parameters, stat trackers,
                                             the running reward normaliser)
        progress.json                        next epoch, samples, per-epoch metrics, size of every file

Guarantees: a checkpoint is assembled under a hidden staging name and renamed into place, and ``latest`` is
replaced only afterwards, so a kill at any moment leaves ``latest`` naming a complete checkpoint; a checkpoint
whose tensors are not all finite is never written; a second job on a folder a live job owns is refused; the
leftovers of a killed save are removed by the next start; ``run.keep_checkpoints`` bounds the disk. Nothing
here is a pickle: tensors go to safetensors, everything else to JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scoreaction.checkpoint import (
    LATEST_FILE,
    METADATA_FILE,
    PROGRESS_JSON,
    STATE_JSON,
    STATE_STEM,
    STATE_TENSORS,
    CheckpointError,
    atomic_write_text,
    latest_in,
    save_checkpoint,
    step_number,
)

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
OWNER_FILE = "run.json"
DEFAULT_LEASE_S = 60.0
LEFTOVER_MARKERS = (".staging-", ".tmp-", ".old-", ".stale-")


class ResumeError(ValueError):
    """A run cannot be started or resumed in this folder (checkpoints of another run, an incompatible
    config, nothing to resume from)."""


class RunLockedError(ResumeError):
    """Another live job owns the run folder."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint was refused because some of its tensors are NaN or infinite."""


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
# Leftovers and retention
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


def prune_checkpoints(checkpoint_dir: str | os.PathLike, keep: int | None) -> list[str]:
    """Delete the oldest step folders beyond the newest `keep` (None: keep all), never the one ``latest``
    names nor any newer one. Each is renamed to a hidden name first, so a kill mid-delete leaves no
    half-deleted checkpoint."""
    if keep is None:
        return []
    root = Path(checkpoint_dir)
    latest = latest_in(root)
    if latest is None:
        return []
    top = step_number(latest.name)
    steps = sorted(
        (n, p) for p in root.iterdir() if (n := step_number(p.name)) is not None and n <= top and p.is_dir()
    )
    doomed = [p for _, p in steps[: max(0, len(steps) - keep)] if p != latest]
    for p in doomed:
        gone = root / f".{p.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(p, gone)
        shutil.rmtree(gone, ignore_errors=True)
    if doomed:
        logger.info("run.keep_checkpoints=%d: removed %s", keep, [p.name for p in doomed])
    return [p.name for p in doomed]


# --------------------------------------------------------------------------------------------------
# Nested state <-> (tensors, JSON)
# --------------------------------------------------------------------------------------------------


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts with str/int keys, lists, tuples, tensors, numbers, strings, None) into
    a flat {name: tensor} dict and a JSON-able skeleton that refers to the tensors by name."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().to("cpu").contiguous()
            return {"__tensor__": path}
        if isinstance(x, dict):
            return {"__dict__": [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if hasattr(x, "item") and not isinstance(x, str | bytes):  # numpy scalars
            return x.item()
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path!r} without pickle")

    return tensors, walk(state, "state")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            return {k: walk(v) for k, v in x["__dict__"]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or +-inf."""
    return [
        name
        for name, t in tensors.items()
        if torch.is_floating_point(t) and t.numel() and not bool(torch.isfinite(t).all())
    ]


def _non_finite_numbers(skeleton: Any, path: str = "state") -> list[str]:
    if isinstance(skeleton, float):
        return [] if math.isfinite(skeleton) else [path]
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return []
        items = skeleton.get("__dict__") or [[i, v] for i, v in enumerate(skeleton.get("__tuple__", []))]
        return [bad for k, v in items for bad in _non_finite_numbers(v, f"{path}.{k}")]
    if isinstance(skeleton, list):
        return [bad for i, v in enumerate(skeleton) for bad in _non_finite_numbers(v, f"{path}.{i}")]
    return []


def save_state(state: Any, directory: Path, stem: str = STATE_STEM) -> None:
    tensors, skeleton = flatten_state(state)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, stem: str = STATE_STEM) -> Any:
    tensors = load_file(str(directory / f"{stem}.safetensors"))
    return unflatten_state(tensors, json.loads((directory / f"{stem}.json").read_text()))


# --------------------------------------------------------------------------------------------------
# Training checkpoints
# --------------------------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_step_dir(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest complete training checkpoint: the one ``latest`` names, else (``latest`` missing or
    corrupt) the newest complete step folder."""
    return latest_in(checkpoint_dir, training=True)


def latest_step(checkpoint_dir: str | os.PathLike) -> int:
    path = latest_step_dir(checkpoint_dir)
    return -1 if path is None else json.loads((path / PROGRESS_JSON).read_text())["epoch"]


def check_finite(policy, learner_state: Any) -> None:
    """Raise NonFiniteCheckpointError naming every policy weight or training-state entry that is NaN/inf."""
    bad = [f"policy.{n}" for n in non_finite(policy.trainable_state_dict())]
    tensors, skeleton = flatten_state(learner_state)
    bad += non_finite(tensors) + _non_finite_numbers(skeleton)
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise NonFiniteCheckpointError(
            f"refusing to write a checkpoint with non-finite values (NaN or inf) in {len(bad)} tensor(s): "
            f"{shown}; 'latest' still names the last good checkpoint (--resume continues from it)"
        )


def write_training_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    policy,
    learner_state: dict,
    progress: dict,
    config: dict | None = None,
    metrics: dict | None = None,
    before_publish=None,
) -> Path:
    """Assemble step_<step>/ under a staging name and rename it into place (``latest`` is not touched:
    call publish_latest after). Refuses non-finite weights or state (nothing is written), and to replace the
    folder ``latest`` names or an older one. before_publish(): called just before the rename (fault tests)."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    check_finite(policy, learner_state)
    if step <= latest_step(root):
        raise ResumeError(
            f"refusing to write {step_name(step)} in {str(root)!r}: 'latest' already names step "
            f"{latest_step(root)}; checkpoints are only ever added after it"
        )
    staging = root / f".staging-{step_name(step)}-{uuid.uuid4().hex[:8]}"
    try:
        save_checkpoint(policy, staging, step, config, metrics)
        save_state(learner_state, staging, STATE_STEM)
        files = {str(f.relative_to(staging)): f.stat().st_size for f in staging.rglob("*") if f.is_file()}
        (staging / PROGRESS_JSON).write_text(json.dumps({**progress, "files": files}))
        _fsync_tree(staging)
        if before_publish is not None:
            before_publish()
        final = root / step_name(step)
        if final.exists():  # left by a run that died before publishing it: newer than 'latest'
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def publish_latest(checkpoint_dir: str | os.PathLike, path: Path, keep: int | None = None) -> None:
    """Point ``latest`` at path (atomically), then drop the checkpoints beyond run.keep_checkpoints."""
    atomic_write_text(Path(checkpoint_dir) / LATEST_FILE, Path(path).name + "\n")
    prune_checkpoints(checkpoint_dir, keep)


def read_training_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(training state, progress) of a checkpoint folder; the policy loads with scoreaction.checkpoint."""
    p = Path(path)
    missing = [n for n in (STATE_TENSORS, STATE_JSON, PROGRESS_JSON, METADATA_FILE) if not (p / n).is_file()]
    if missing:
        raise ResumeError(f"checkpoint {str(p)!r} is incomplete or not a training checkpoint: no {missing}")
    return load_state(p, STATE_STEM), json.loads((p / PROGRESS_JSON).read_text())


def _fsync_tree(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# --------------------------------------------------------------------------------------------------
# The running reward normaliser (reward.normalize: running)
# --------------------------------------------------------------------------------------------------


def reward_stats_state(reward_fn) -> dict[str, list[float]] | None:
    """{part: [count, mean, m2]} of a WeightedSum with running normalisation, else None."""
    stats = getattr(reward_fn, "stats", None)
    if getattr(reward_fn, "normalize", None) != "running" or not stats:
        return None
    return {name: [int(s.count), float(s.mean), float(s.m2)] for name, s in stats.items()}


def load_reward_stats(reward_fn, state: dict[str, list[float]] | None) -> None:
    if not state:
        return
    stats = getattr(reward_fn, "stats", None)
    if stats is None or set(stats) != set(state):
        raise ResumeError(
            f"the checkpoint holds running reward statistics for {sorted(state)} but the reward has "
            f"{sorted(stats or {})}"
        )
    for name, (count, mean, m2) in state.items():
        stats[name].count, stats[name].mean, stats[name].m2 = int(count), float(mean), float(m2)


# --------------------------------------------------------------------------------------------------
# Resume checks
# --------------------------------------------------------------------------------------------------

# Fields a resumed run may change: where things go, how many epochs (see check_resume), resources and
# logging/checkpoint cadence.
RESUMABLE_CHANGES = (
    "run.epochs",
    "run.output_dir",
    "run.storage_path",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.grid_every",
    # a stopping rule, not a number the run computes: raise it to resume after a skipped-steps stop
    "algorithm.max_skipped_steps",
)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ, except the sections a resumed run may change."""
    out: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if path in RESUMABLE_CHANGES or path == "resources":
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")

    walk(saved, current, "")
    return out


def check_resume(cfg, checkpoint_dir: Path, resume: bool) -> Path | None:
    """Refuse to mix runs: without resume the folder must hold no checkpoint; with resume it must hold a
    training checkpoint of a run with the same settings. Returns the checkpoint to resume from."""
    any_latest = latest_in(checkpoint_dir)
    latest = latest_step_dir(checkpoint_dir)
    if not resume:
        found = latest or any_latest
        if found is not None:
            raise ResumeError(
                f"{str(checkpoint_dir)!r} already holds a run's checkpoints (latest: {found.name}); pass "
                "--resume to continue that run, or choose another --output-dir. Nothing was overwritten."
            )
        return None
    if latest is None:
        what = (
            "only checkpoints without learner state (written by an older version?)"
            if any_latest
            else "no checkpoint"
        )
        raise ResumeError(
            f"--resume: {str(checkpoint_dir)!r} holds {what} to resume from; run without --resume to start "
            "a new run there, or point --output-dir at the run to continue"
        )
    _, progress = read_training_checkpoint(latest)
    saved = json.loads((latest / METADATA_FILE).read_text()).get("config", {})
    current = cfg.model_dump()
    diffs = config_differences(saved, current)
    if diffs:
        raise ResumeError(
            f"--resume: the config differs from the run in {str(checkpoint_dir)!r} in: {'; '.join(diffs)}. "
            "A resumed run may change only run.epochs (constant learning rate), the output/storage paths, "
            "checkpoint/grid cadence, run.keep_checkpoints and resources."
        )
    saved_epochs = saved.get("run", {}).get("epochs", cfg.run.epochs)
    schedule = cfg.algorithm.lr_schedule
    if saved_epochs != cfg.run.epochs:
        if schedule != "constant":
            raise ResumeError(
                f"--resume: run.epochs={cfg.run.epochs} but the run was planned with run.epochs={saved_epochs}, "
                f"and algorithm.lr_schedule={schedule!r} decays the learning rate over run.epochs: the epochs "
                f"already trained followed that schedule, and stretching it mid-run would change its meaning. "
                f"Refused; resume with "
                f"run.epochs={saved_epochs}, or start a new run"
            )
        logger.info(
            "--resume: run.epochs %d -> %d; algorithm.lr_schedule='constant', so the learning rate keeps its "
            "meaning",
            saved_epochs,
            cfg.run.epochs,
        )
    if progress["epoch"] > cfg.run.epochs:
        raise ResumeError(
            f"--resume: the checkpoint is at epoch {progress['epoch']} but run.epochs={cfg.run.epochs}; "
            "set run.epochs to at least that"
        )
    return latest


# --------------------------------------------------------------------------------------------------
# Opening a run folder
# --------------------------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """An owned run folder: where checkpoints go, the lock, the checkpoint to resume from (or None)."""

    checkpoint_dir: Path
    lock: RunLock
    resume_from: Path | None

    @property
    def run_id(self) -> str:
        return self.lock.run_id

    def close(self) -> None:
        self.lock.release()


def open_run(cfg, out: str | os.PathLike, resume: bool, lease_s: float = DEFAULT_LEASE_S) -> RunFolder:
    """Own the run folder (or fail clearly, touching nothing), remove the leftovers of an interrupted save,
    and check that the folder may be started (resume=False) or resumed (resume=True)."""
    out = Path(out).expanduser().resolve()
    checkpoint_dir = checkpoint_dir_for(cfg, out)
    check_not_locked(checkpoint_dir.parent)  # a refused folder is left untouched (not even created)
    check_resume(cfg, checkpoint_dir, resume)
    lock = RunLock(checkpoint_dir.parent, lease_s=lease_s).acquire()
    try:
        if cfg.run.storage_path:
            claim_root(checkpoint_dir, out)
        clean_leftovers(checkpoint_dir)
        resume_from = check_resume(cfg, checkpoint_dir, resume)
    except BaseException:
        lock.release()
        raise
    return RunFolder(checkpoint_dir, lock, resume_from)
