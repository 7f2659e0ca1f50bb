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

    ownership.py            where checkpoints go, the lock, leftovers of an interrupted save
    resume.py               whether a folder may be started or resumed with this config
    training_checkpoint.py  the training-checkpoint writer and reader, ``latest``, retention
    errors.py               ResumeError, RunLockedError, NonFiniteCheckpointError

Every name is importable from ``scoreaction.run_folder``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scoreaction.run_folder.errors import NonFiniteCheckpointError, ResumeError, RunLockedError
from scoreaction.run_folder.ownership import (
    DEFAULT_LEASE_S,
    LEFTOVER_MARKERS,
    LOCK_FILE,
    OWNER_FILE,
    RunLock,
    check_not_locked,
    checkpoint_dir_for,
    claim_root,
    clean_leftovers,
    lock_is_stale,
    read_lock,
    read_lock_file,
    verify_owner,
)
from scoreaction.run_folder.resume import RESUMABLE_CHANGES, check_resume, config_differences
from scoreaction.run_folder.training_checkpoint import (
    check_finite,
    flatten_state,
    latest_step,
    latest_step_dir,
    load_reward_stats,
    load_state,
    non_finite,
    prune_checkpoints,
    publish_latest,
    read_training_checkpoint,
    reward_stats_state,
    save_state,
    step_name,
    unflatten_state,
    write_training_checkpoint,
)

__all__ = [
    "DEFAULT_LEASE_S",
    "LEFTOVER_MARKERS",
    "LOCK_FILE",
    "OWNER_FILE",
    "RESUMABLE_CHANGES",
    "NonFiniteCheckpointError",
    "ResumeError",
    "RunFolder",
    "RunLock",
    "RunLockedError",
    "check_finite",
    "check_not_locked",
    "check_resume",
    "checkpoint_dir_for",
    "claim_root",
    "clean_leftovers",
    "config_differences",
    "flatten_state",
    "latest_step",
    "latest_step_dir",
    "load_reward_stats",
    "load_state",
    "lock_is_stale",
    "non_finite",
    "open_run",
    "prune_checkpoints",
    "publish_latest",
    "read_lock",
    "read_lock_file",
    "read_training_checkpoint",
    "reward_stats_state",
    "save_state",
    "step_name",
    "unflatten_state",
    "verify_owner",
    "write_training_checkpoint",
]


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
