"""Training checkpoints: the training state as safetensors + JSON (never a pickle), the writer that
assembles ``step_<N>/`` under a staging name and renames it into place, ``latest`` and retention, the reader,
and the running reward normaliser's statistics that travel with the state."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
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
    atomic_write_text,
    latest_in,
    save_checkpoint,
    step_number,
)
from scoreaction.run_folder.errors import NonFiniteCheckpointError, ResumeError

logger = logging.getLogger(__name__)


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
# Retention (run.keep_checkpoints)
# --------------------------------------------------------------------------------------------------


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
