"""Training checkpoints of a run, as the distributed layer names them.

The mechanism lives in ``scoreaction.run_folder`` (one format, one ``latest`` reader and one writer for
both the single-process Trainer and the distributed learner); this module re-exports it under the names the
distributed code and its tests use.
"""

from __future__ import annotations

from scoreaction.checkpoint import PROGRESS_JSON, STATE_JSON, STATE_STEM, STATE_TENSORS
from scoreaction.run_folder import (
    RESUMABLE_CHANGES,
    NonFiniteCheckpointError,
    ResumeError,
    RunLockedError,
    check_resume,
    clean_leftovers,
    config_differences,
    flatten_state,
    latest_step,
    latest_step_dir,
    load_state,
    prune_checkpoints,
    publish_latest,
    read_training_checkpoint,
    save_state,
    step_name,
    unflatten_state,
    write_training_checkpoint,
)

__all__ = [
    "PROGRESS_JSON",
    "RESUMABLE_CHANGES",
    "STATE_JSON",
    "STATE_STEM",
    "STATE_TENSORS",
    "NonFiniteCheckpointError",
    "ResumeError",
    "RunLockedError",
    "check_resume",
    "clean_leftovers",
    "config_differences",
    "flatten_state",
    "latest_step",
    "latest_step_dir",
    "load_state",
    "prune_checkpoints",
    "publish_latest",
    "read_training_checkpoint",
    "save_state",
    "step_name",
    "unflatten_state",
    "write_training_checkpoint",
]
