"""Model ids of the serving API: the base model and every checkpoint under a checkpoint root.

A checkpoint root holds one folder per fine-tuning run (what ``jobs/finetune.py --output-dir`` writes):

    <root>/<run>/checkpoints/step_000008/{checkpoint.json, pytorch_lora_weights.safetensors}
    <root>/<run>/checkpoints/latest            names the newest complete checkpoint
    <root>/<run>/summary.json                  written when the run finishes

Model ids are flat (never a path):

    base                  the untuned model (the policy with its adapter disabled)
    <run>                 the run's latest checkpoint, resolved at request time (so it follows a running job)
    <run>@step_000008     one checkpoint

An id holding '/', '\\' or '..' is refused (``ModelIdError``, HTTP 400) before the file system is touched,
and every resolved path is checked to lie inside the root after symlinks are followed. Unknown ids raise
``UnknownModelError`` (HTTP 404). The listing is read from disk on every call, so checkpoints written by a
running job appear at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scoreaction.checkpoint import METADATA_FILE, CheckpointError, latest_checkpoint, read_metadata

logger = logging.getLogger(__name__)

BASE_MODEL_ID = "base"
_RUN_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
_ID_RE = re.compile(rf"^(?P<run>{_RUN_RE})(?:@(?P<step>step_\d{{1,9}}))?$")
_STEP_DIR_RE = re.compile(r"^step_\d{1,9}$")
REWARD_KEY = "rollout/reward_mean"


class ModelIdError(ValueError):
    """A syntactically invalid model id (HTTP 400)."""

    status_code = 400


class UnknownModelError(LookupError):
    """A well-formed model id that names no model under the root (HTTP 404)."""

    status_code = 404


@dataclass(frozen=True)
class ResolvedModel:
    """What a model id names now. ``key`` is immutable content: run aliases are resolved to a step, and the
    checkpoint's creation time is part of it, so a checkpoint rewritten in place gets a new key."""

    id: str  # the concrete id: 'base' or 'run@step_NNNNNN'
    path: str | None  # checkpoint folder; None for the base model
    key: str  # multiplexing key (cache identity)


def validate_model_id(model_id: str) -> re.Match[str] | None:
    """Raise ModelIdError for ids that could leave the root; return the id's match (None for 'base')."""
    if not isinstance(model_id, str) or not model_id:
        raise ModelIdError(f"model={model_id!r} is empty: give a model id from GET /v1/models")
    if "/" in model_id or "\\" in model_id or ".." in model_id or "\x00" in model_id:
        raise ModelIdError(
            f"model={model_id!r} is not allowed: model ids never contain '/', '\\' or '..' "
            f"(use 'base', 'RUN' or 'RUN@step_NNNNNN' from GET /v1/models)"
        )
    if model_id == BASE_MODEL_ID:
        return None
    m = _ID_RE.match(model_id)
    if m is None:
        raise ModelIdError(
            f"model={model_id!r} is not a model id: allowed are 'base', 'RUN' and 'RUN@step_NNNNNN' where RUN "
            "is letters, digits, '_', '-' and '.' (see GET /v1/models)"
        )
    return m


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


class CheckpointCatalog:
    """The models under one checkpoint root (a folder of runs, or a single run folder)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------------------------------------
    # Runs
    # ----------------------------------------------------------------------------------------------

    def runs(self) -> dict[str, Path]:
        """Run name -> run folder, sorted by name. A root that is itself a run appears under its own name."""
        out: dict[str, Path] = {}
        if not self.root.is_dir():
            return out
        candidates = [self.root] + sorted(p for p in self.root.iterdir() if p.is_dir())
        for run_dir in candidates:
            name = run_dir.resolve().name if run_dir == self.root else run_dir.name
            if not (run_dir / "checkpoints").is_dir() or name.startswith("."):
                continue
            if not re.fullmatch(_RUN_RE, name) or ".." in name or name == BASE_MODEL_ID:
                logger.warning("run folder %s has a name that is not a valid model id; skipped", run_dir)
                continue
            if _inside(run_dir, self.root):
                out.setdefault(name, run_dir)
        return out

    def _run_dir(self, run: str) -> Path:
        run_dir = self.runs().get(run)
        if run_dir is None:
            raise UnknownModelError(
                f"model={run!r} is unknown: no run folder {run!r} with checkpoints under the checkpoint root "
                "(see GET /v1/models)"
            )
        return run_dir

    # ----------------------------------------------------------------------------------------------
    # Resolve
    # ----------------------------------------------------------------------------------------------

    def resolve(self, model_id: str) -> ResolvedModel:
        """Model id -> concrete checkpoint. Raises ModelIdError (400) or UnknownModelError (404)."""
        m = validate_model_id(model_id)
        if m is None:
            return ResolvedModel(id=BASE_MODEL_ID, path=None, key=BASE_MODEL_ID)
        run, step = m.group("run"), m.group("step")
        run_dir = self._run_dir(run)
        if step is None:
            path = latest_checkpoint(run_dir)
            if path is None:
                raise UnknownModelError(f"model={model_id!r}: the run has no complete checkpoint yet")
        else:
            path = run_dir / "checkpoints" / step
            if not (path / METADATA_FILE).is_file():
                raise UnknownModelError(
                    f"model={model_id!r} is unknown: run {run!r} has no checkpoint {step} "
                    f"(see GET /v1/models)"
                )
        if not _inside(path, self.root):
            raise ModelIdError(f"model={model_id!r} resolves outside the checkpoint root; refused")
        meta = read_metadata(path)
        concrete = f"{run}@{path.name}"
        created = meta.get("created_at", 0)
        return ResolvedModel(id=concrete, path=str(path.resolve()), key=f"{concrete}:{created}")

    # ----------------------------------------------------------------------------------------------
    # List
    # ----------------------------------------------------------------------------------------------

    def list_models(self) -> list[dict[str, Any]]:
        """'base', then per run its alias and every checkpoint (oldest first), as ModelInfo dicts."""
        models: list[dict[str, Any]] = [{"id": BASE_MODEL_ID, "kind": "base", "created": 0}]
        for run, run_dir in self.runs().items():
            summary = _read_json(run_dir / "summary.json")
            latest = latest_checkpoint(run_dir)
            entries = []
            step_dirs = sorted(p for p in (run_dir / "checkpoints").iterdir() if _STEP_DIR_RE.match(p.name))
            for path in step_dirs:
                if not (path / METADATA_FILE).is_file():
                    continue  # being written
                try:
                    meta = read_metadata(path)
                except CheckpointError as exc:
                    logger.warning("skipping checkpoint %s: %s", path, exc)
                    continue
                entries.append(_entry(run, path, meta, summary, final=latest is not None and path == latest))
            models += entries
            if latest is not None:
                alias = next((e for e in entries if e["id"] == f"{run}@{latest.name}"), None)
                if alias is not None:
                    models.append(dict(alias, id=run, kind="run", alias_of=alias["id"]))
        return models


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _entry(
    run: str, path: Path, meta: dict[str, Any], summary: dict[str, Any] | None, final: bool
) -> dict[str, Any]:
    """One checkpoint's ModelInfo. Reward: the finished run's final evaluation for its last checkpoint,
    else the mean reward of the rollout of the epoch that wrote the checkpoint."""
    step = int(meta.get("step", 0))
    reward, source = meta.get("metrics", {}).get(REWARD_KEY), "checkpoint.metrics"
    if final and summary and summary.get("epochs") == step and "final" in summary:
        reward, source = summary["final"].get("reward_mean"), "summary.final"
    reward_name = (meta.get("config") or {}).get("reward", {}).get("name")
    return {
        "id": f"{run}@{path.name}",
        "kind": "checkpoint",
        "run": run,
        "step": step,
        "created": int(meta.get("created_at", 0)),
        "reward": float(reward) if reward is not None else None,
        "reward_name": reward_name,
        "reward_source": source if reward is not None else None,
        "base_model": meta.get("base_model"),
    }
