"""Resume checks: a folder is started only when it holds no run, and resumed only from a training
checkpoint of a run with the same settings (except the fields a resumed run may change)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from scoreaction.checkpoint import METADATA_FILE, latest_in
from scoreaction.run_folder.errors import ResumeError
from scoreaction.run_folder.training_checkpoint import latest_step_dir, read_training_checkpoint

logger = logging.getLogger(__name__)

# Fields a resumed run may change: where things go, how many epochs (see check_resume), resources and
# logging/checkpoint cadence.
RESUMABLE_CHANGES = (
    "run.epochs",
    "run.output_dir",
    "run.storage_path",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.grid_every",
    # what is evaluated on the side: the training numbers do not depend on it
    "run.eval_num_steps",
    "run.eval_every",
    "run.eval_num_samples",
    # the name of the preset the config was built from: a label; the settings it gave are compared one by one
    "run.preset",
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
