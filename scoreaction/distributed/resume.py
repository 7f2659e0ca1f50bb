"""Training checkpoints of a distributed run: policy + learner state + progress, written atomically.

One checkpoint folder, ``<checkpoint_dir>/step_<N>/`` (N = epochs done):

    pytorch_lora_weights.safetensors | unet/ | toy_policy.safetensors   the policy (scoreaction.checkpoint)
    checkpoint.json                      base model, kind, step, config, metrics
    learner_state.safetensors            every tensor of Learner.state_dict(): optimisers, F_phi, RNG
    learner_state.json                   the rest of it (step counts, hyper-parameters, the stat tracker)
    progress.json                        next epoch, samples seen, per-epoch metrics so far, world size

Nothing here is a pickle: tensors go to safetensors, everything else to JSON, so loading a checkpoint
from a user-controllable path never runs code. The folder is assembled under a hidden staging name and
renamed into place; ``latest`` is replaced (os.replace) only after that, so a kill at any moment leaves
``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from scoreaction.checkpoint import LATEST_FILE, METADATA_FILE, atomic_write_text, save_checkpoint

STATE_STEM = "learner_state"
STATE_TENSORS = f"{STATE_STEM}.safetensors"
STATE_JSON = f"{STATE_STEM}.json"
PROGRESS_JSON = "progress.json"


class ResumeError(ValueError):
    """A run cannot be resumed from this folder (missing, incomplete or incompatible checkpoint)."""


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


def save_state(state: Any, directory: Path, stem: str) -> None:
    tensors, skeleton = flatten_state(state)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(skeleton))


def load_state(directory: Path, stem: str) -> Any:
    tensors = load_file(str(directory / f"{stem}.safetensors"))
    return unflatten_state(tensors, json.loads((directory / f"{stem}.json").read_text()))


# --------------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------------


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_step_dir(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names, if it is complete."""
    root = Path(checkpoint_dir)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / PROGRESS_JSON).is_file() and (path / METADATA_FILE).is_file() else None


def latest_step(checkpoint_dir: str | os.PathLike) -> int:
    path = latest_step_dir(checkpoint_dir)
    return -1 if path is None else json.loads((path / PROGRESS_JSON).read_text())["epoch"]


def write_training_checkpoint(
    checkpoint_dir: str | os.PathLike,
    step: int,
    policy,
    learner_state: dict,
    progress: dict,
    config: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Assemble step_<step>/ under a staging name and rename it into place (``latest`` is not touched:
    call publish_latest after). Refuses to replace the folder ``latest`` names or an older one."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    if step <= latest_step(root):
        raise ResumeError(
            f"refusing to write {step_name(step)} in {str(root)!r}: 'latest' already names step "
            f"{latest_step(root)}; checkpoints are only ever added after it"
        )
    staging = root / f".staging-{step_name(step)}-{uuid.uuid4().hex[:8]}"
    try:
        save_checkpoint(policy, staging, step, config, metrics)
        save_state(learner_state, staging, STATE_STEM)
        (staging / PROGRESS_JSON).write_text(json.dumps(progress))
        _fsync_tree(staging)
        final = root / step_name(step)
        if final.exists():  # left by a run that died before publishing it: newer than 'latest'
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def publish_latest(checkpoint_dir: str | os.PathLike, path: Path) -> None:
    atomic_write_text(Path(checkpoint_dir) / LATEST_FILE, path.name + "\n")


def read_training_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """(learner_state, progress) of a checkpoint folder; the policy loads with scoreaction.checkpoint."""
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


# Fields a resumed run may change: where things go, how many epochs, resources and logging cadence.
RESUMABLE_CHANGES = (
    "run.epochs",
    "run.output_dir",
    "run.storage_path",
    "run.checkpoint_every",
    "run.grid_every",
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
