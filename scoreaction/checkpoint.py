"""Checkpoints in diffusers' formats, written atomically, read without unpickling anything.

Layout of one checkpoint folder:

    pytorch_lora_weights.safetensors   LoRA (mode=lora): loads with StableDiffusionPipeline.load_lora_weights(dir)
    unet/                              full fine-tune (mode=full): a diffusers UNet folder (safetensors)
    checkpoint.json                    base model, kind, step, config

A run keeps its checkpoints under ``<output_dir>/checkpoints/step_<N>/`` with a ``latest`` file naming the
newest complete one. Each folder is written to a temporary sibling and renamed into place, and ``latest``
is replaced (os.replace) only afterwards, so a kill at any moment never leaves a broken "latest".
``latest_in`` is the one reader of ``latest`` (serving, evaluation and both training backends): when
``latest`` is missing or corrupt it falls back to the newest complete step folder. Training checkpoints
(policy + training state + progress) are written by ``scoreaction.run_folder``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from scoreaction.model_card import write_model_card
from scoreaction.models.toy_gmm import ToyPolicy
from scoreaction.policy import ADAPTER_NAME, DiffusionPolicy

METADATA_FILE = "checkpoint.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
TOY_FILE = "toy_policy.safetensors"
LATEST_FILE = "latest"
STATE_STEM = "learner_state"
STATE_TENSORS = f"{STATE_STEM}.safetensors"
STATE_JSON = f"{STATE_STEM}.json"
PROGRESS_JSON = "progress.json"
FORMAT_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


logger = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, of a refused format, or does not match the policy."""


# --------------------------------------------------------------------------------------------------
# Atomic file system helpers
# --------------------------------------------------------------------------------------------------


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path via a temp file, fsync and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _publish_dir(tmp: Path, final: Path) -> None:
    """Move a completed temp folder to final, replacing an older one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(final, old)
    os.rename(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def save_checkpoint(
    policy: DiffusionPolicy | ToyPolicy,
    directory: str | os.PathLike,
    step: int,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write the policy's trainable weights and metadata to directory, atomically."""
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        kind = policy.cfg.mode
        meta: dict[str, Any] = {
            "format": "scoreaction-checkpoint",
            "version": FORMAT_VERSION,
            "kind": kind,
            "base_model": policy.base_model,
            "step": int(step),
            "created_at": time.time(),
            "config": config or {},
            "metrics": metrics or {},
        }
        if isinstance(policy, ToyPolicy):
            kind = meta["kind"] = "toy"
            save_file(policy.trainable_state_dict(), str(tmp / TOY_FILE))
        elif kind == "lora":
            lora_cfg = policy.unet.peft_config[ADAPTER_NAME]
            state = convert_state_dict_to_diffusers(policy.trainable_state_dict())
            StableDiffusionPipeline.save_lora_weights(
                tmp,
                unet_lora_layers=state,
                unet_lora_adapter_metadata=lora_cfg.to_dict(),
                safe_serialization=True,
            )
            meta["lora"] = {
                "rank": lora_cfg.r,
                "alpha": lora_cfg.lora_alpha,
                "target_modules": sorted(lora_cfg.target_modules),
            }
        else:
            policy.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        atomic_write_text(tmp / METADATA_FILE, json.dumps(meta, indent=2, default=str))
        write_model_card(tmp, meta)  # README.md: base_model, reward, steps, how to load it in diffusers
        _publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_run_checkpoint(
    policy: DiffusionPolicy, run_dir: str | os.PathLike, step: int, config=None, metrics=None
) -> Path:
    """Save the policy alone under run_dir/checkpoints/step_<N>, then point run_dir/checkpoints/latest at
    it (training runs write training checkpoints instead: scoreaction.run_folder)."""
    root = Path(run_dir) / "checkpoints"
    path = save_checkpoint(policy, root / f"step_{step:06d}", step, config, metrics)
    atomic_write_text(root / LATEST_FILE, path.name + "\n")
    return path


def step_number(name: str) -> int | None:
    """N of a folder named step_<N>, else None."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def _json_file(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_complete(path: str | os.PathLike, training: bool = False) -> bool:
    """Whether a step folder holds a complete checkpoint: valid checkpoint.json and, for a training
    checkpoint (or whenever progress.json exists), a valid progress.json whose every listed file is present
    with its recorded size. training=True also asks for the training state."""
    p = Path(path)
    meta = _json_file(p / METADATA_FILE)
    if meta is None or meta.get("kind") not in ("lora", "full", "toy"):
        return False
    if not training and not (p / PROGRESS_JSON).exists():
        return True
    progress = _json_file(p / PROGRESS_JSON)
    if progress is None or "epoch" not in progress:
        return False
    if training and not ((p / STATE_TENSORS).is_file() and (p / STATE_JSON).is_file()):
        return False
    for rel, size in (progress.get("files") or {}).items():
        f = p / rel
        if not f.is_file() or f.stat().st_size != size:
            return False
    return True


def latest_in(checkpoint_dir: str | os.PathLike, training: bool = False) -> Path | None:
    """The checkpoint ``latest`` names in a checkpoints folder if it is complete; else (``latest`` missing,
    corrupt or naming an incomplete folder) the newest complete step folder, with a warning; else None.
    training=True: training checkpoints only (policy + training state + progress)."""
    root = Path(checkpoint_dir)
    pointer = root / LATEST_FILE
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        name = None
    except (OSError, UnicodeDecodeError):
        name = ""
    if name and step_number(name) is not None and checkpoint_complete(root / name, training):
        return root / name
    try:
        entries = list(root.iterdir())
    except OSError:
        return None
    steps = sorted(((n, p) for p in entries if (n := step_number(p.name)) is not None), reverse=True)
    for _, path in steps:
        if path.is_dir() and checkpoint_complete(path, training):
            if name is not None:
                logger.warning(
                    "%s names %r, which is not a complete checkpoint; using the newest complete one, %s",
                    pointer,
                    name,
                    path.name,
                )
            return path
    return None


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder (its checkpoints/latest, see latest_in), or None."""
    return latest_in(Path(run_dir) / "checkpoints")


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise if path is (or is a folder holding only) a pickle-based weights format."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"checkpoint {str(p)!r} is a pickle format ({p.suffix}); only safetensors are loaded, since "
            "unpickling can run arbitrary code. Convert it with safetensors.torch.save_file first."
        )
    if p.is_dir():
        pickles = sorted(q.name for q in p.rglob("*") if q.suffix.lower() in PICKLE_SUFFIXES)
        has_safe = any(p.rglob("*.safetensors"))
        if pickles and not has_safe:
            raise CheckpointError(
                f"checkpoint folder {str(p)!r} holds only pickle weights ({', '.join(pickles[:3])}); only "
                "safetensors are loaded. Convert them with safetensors.torch.save_file first."
            )


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    d = Path(directory)
    refuse_pickle(d)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {str(d)!r} is not a folder")
    meta_path = d / METADATA_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"checkpoint {str(d)!r} has no {METADATA_FILE}: not a scoreaction checkpoint, or incomplete"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint metadata {str(meta_path)!r} is not valid JSON: {exc}") from exc
    if meta.get("kind") not in ("lora", "full", "toy"):
        raise CheckpointError(
            f"checkpoint {str(d)!r}: kind={meta.get('kind')!r}; allowed: 'lora', 'full', 'toy'"
        )
    return meta


def load_lora_state(directory: str | os.PathLike) -> dict:
    """LoRA weights of a checkpoint in peft key format (the policy's adapter layout)."""
    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise CheckpointError(f"LoRA checkpoint {str(directory)!r} has no {LORA_FILE}")
    state = load_file(str(path))
    unet_state = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    if not unet_state:
        raise CheckpointError(f"{str(path)!r} holds no UNet LoRA weights (keys starting with 'unet.')")
    return convert_unet_state_dict_to_peft(unet_state)


def load_checkpoint(policy: DiffusionPolicy, directory: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint's weights into the policy (same mode); returns its metadata."""
    meta = read_metadata(directory)
    if isinstance(policy, ToyPolicy) or meta["kind"] == "toy":
        if not (isinstance(policy, ToyPolicy) and meta["kind"] == "toy"):
            raise CheckpointError(
                f"checkpoint {str(directory)!r} (kind={meta['kind']!r}) does not match the policy"
            )
        policy.load_trainable_state_dict(load_file(str(Path(directory) / TOY_FILE)))
        return meta
    if meta["kind"] != policy.cfg.mode:
        raise CheckpointError(
            f"checkpoint {str(directory)!r} is a {meta['kind']} checkpoint but policy.mode={policy.cfg.mode!r}"
        )
    if meta["kind"] == "lora":
        lora = meta.get("lora", {})
        if lora and lora.get("rank") != policy.cfg.lora_rank:
            raise CheckpointError(
                f"checkpoint LoRA rank {lora.get('rank')} differs from policy.lora_rank={policy.cfg.lora_rank}"
            )
        policy.load_trainable_state_dict(load_lora_state(directory))
    else:
        unet = UNet2DConditionModel.from_pretrained(Path(directory) / "unet", use_safetensors=True)
        policy.load_trainable_state_dict(unet.state_dict())
    return meta
