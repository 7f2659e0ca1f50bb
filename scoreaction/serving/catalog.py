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
``UnknownModelError`` (HTTP 404); a run with no complete checkpoint yet, or a step folder without its
``checkpoint.json``, ``ModelNotReadyError`` (HTTP 503: being written); a checkpoint whose metadata cannot be
read, ``UnusableModelError`` (HTTP 422; the model replica raises it too for weights that cannot be loaded). The
listing is read from disk on every call, so checkpoints written by a running job appear at once, and nothing
in one run folder can break it: a checkpoint or run that cannot be read is listed with ``available: false``
and the reason.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scoreaction.checkpoint import METADATA_FILE, CheckpointError, latest_checkpoint, read_metadata
from scoreaction.serving.api import clean_text

logger = logging.getLogger(__name__)

BASE_MODEL_ID = "base"
_RUN_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}"
# fullmatch only (``$`` also matches before a trailing newline); [0-9], not \d (which takes any Unicode digit)
_ID_RE = re.compile(rf"(?P<run>{_RUN_RE})(?:@(?P<step>step_[0-9]{{1,9}}))?")
_STEP_DIR_RE = re.compile(r"step_[0-9]{1,9}")
REWARD_KEY = "rollout/reward_mean"


class ModelIdError(ValueError):
    """A syntactically invalid model id (HTTP 400)."""

    status_code = 400
    code = "invalid_model_id"
    param = "model"


class UnknownModelError(LookupError):
    """A well-formed model id that names no model under the root (HTTP 404)."""

    status_code = 404
    code = "model_not_found"
    param = "model"


class ModelNotReadyError(LookupError):
    """A model that exists but is not complete yet: a run before its first checkpoint, or a checkpoint folder
    still without its metadata (HTTP 503 with Retry-After)."""

    status_code = 503
    code = "model_not_ready"
    param = "model"


class UnusableModelError(CheckpointError):
    """A checkpoint that cannot be served: unreadable or invalid metadata, missing or truncated weights,
    non-finite weights, weights that do not fit the base model (HTTP 422)."""

    status_code = 422
    code = "model_unusable"
    param = "model"


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
        raise ModelIdError(f"model={ascii(model_id)} is empty: give a model id from GET /v1/models")
    if "/" in model_id or "\\" in model_id or ".." in model_id or "\x00" in model_id:
        raise ModelIdError(
            f"model={ascii(model_id)} is not allowed: model ids never contain '/', '\\' or '..' "
            f"(use 'base', 'RUN' or 'RUN@step_NNNNNN' from GET /v1/models)"
        )
    if model_id == BASE_MODEL_ID:
        return None
    m = _ID_RE.fullmatch(model_id)
    if m is None:
        raise ModelIdError(
            f"model={ascii(model_id)} is not a model id: allowed are 'base', 'RUN' and 'RUN@step_NNNNNN' where RUN "
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
        """Run name -> run folder, sorted by name. A root that is itself a run appears under its own name.
        Folders that cannot be read are skipped (logged)."""
        out: dict[str, Path] = {}
        try:
            if not self.root.is_dir():
                return out
            children = sorted(p for p in self.root.iterdir() if p.is_dir())
        except OSError as exc:
            logger.warning("checkpoint root %s cannot be read: %s", self.root, exc)
            return out
        for run_dir in [self.root, *children]:
            name = run_dir.resolve().name if run_dir == self.root else run_dir.name
            try:
                if not (run_dir / "checkpoints").is_dir() or name.startswith("."):
                    continue
            except OSError:
                continue
            if not re.fullmatch(_RUN_RE, name) or ".." in name or name == BASE_MODEL_ID:
                logger.warning("run folder %r has a name that is not a valid model id; skipped", str(run_dir))
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

    def latest(self, run_dir: Path) -> Path | None:
        """The checkpoint a run's alias names: the one ``latest`` names if it is complete and inside the
        root, else the newest step folder holding its metadata (``latest`` missing, unreadable or naming
        an incomplete folder), else None."""
        try:
            path = latest_checkpoint(run_dir)
            if path is not None and _STEP_DIR_RE.fullmatch(path.name) and _inside(path, self.root):
                return path
        except (OSError, ValueError) as exc:  # an unreadable or binary 'latest'
            logger.warning(
                "run %s: 'latest' cannot be read (%s); using the newest complete step", run_dir, exc
            )
        complete = [p for p in _step_dirs(run_dir) if _is_file(p / METADATA_FILE)]
        return complete[-1] if complete else None

    # ----------------------------------------------------------------------------------------------
    # Resolve
    # ----------------------------------------------------------------------------------------------

    def resolve(self, model_id: str) -> ResolvedModel:
        """Model id -> concrete checkpoint. Raises ModelIdError (400), UnknownModelError (404),
        UnusableModelError (422, metadata unreadable) or ModelNotReadyError (503, being written)."""
        m = validate_model_id(model_id)
        if m is None:
            return ResolvedModel(id=BASE_MODEL_ID, path=None, key=BASE_MODEL_ID)
        run, step = m.group("run"), m.group("step")
        run_dir = self._run_dir(run)
        if step is None:
            path = self.latest(run_dir)
            if path is None:
                raise ModelNotReadyError(
                    f"model={model_id!r}: the run has no complete checkpoint yet (its first one is being "
                    "written, or the job has not saved one); retry later or pick a model from GET /v1/models"
                )
        else:
            path = run_dir / "checkpoints" / step
            if not _is_dir(path):
                raise UnknownModelError(
                    f"model={model_id!r} is unknown: run {run!r} has no checkpoint {step} "
                    f"(see GET /v1/models)"
                )
            if not _is_file(path / METADATA_FILE):
                raise ModelNotReadyError(
                    f"model={model_id!r}: checkpoint {step} has no {METADATA_FILE} yet (being written, or left "
                    "incomplete by an interrupted save); retry later or pick a model from GET /v1/models"
                )
        if not _inside(path, self.root):
            raise ModelIdError(f"model={model_id!r} resolves outside the checkpoint root; refused")
        concrete = f"{run}@{path.name}"
        meta = read_meta(path, concrete)
        created = _number(meta.get("created_at"), 0.0)
        return ResolvedModel(id=concrete, path=str(path.resolve()), key=f"{concrete}:{created}")

    # ----------------------------------------------------------------------------------------------
    # List
    # ----------------------------------------------------------------------------------------------

    def list_models(self) -> list[dict[str, Any]]:
        """'base', then per run every checkpoint (oldest first) and its alias, as ModelInfo dicts. A checkpoint
        or run that cannot be read is listed with available=False and the reason; it never fails the list."""
        models: list[dict[str, Any]] = [{"id": BASE_MODEL_ID, "kind": "base", "created": 0}]
        for run, run_dir in self.runs().items():
            try:
                models += self._run_models(run, run_dir)
            except Exception as exc:  # noqa: BLE001 - one bad run folder must not break the listing
                logger.warning("run %s cannot be listed: %s", run_dir, exc)
                reason = f"the run folder cannot be read: {type(exc).__name__}: {exc}"
                models.append(_unavailable(run, "run", run, reason))
        return models

    def _run_models(self, run: str, run_dir: Path) -> list[dict[str, Any]]:
        summary = _read_json(run_dir / "summary.json")
        latest = self.latest(run_dir)
        entries = []
        for path in _step_dirs(run_dir):
            model_id = f"{run}@{path.name}"
            if not _is_file(path / METADATA_FILE):
                reason = f"no {METADATA_FILE}: being written, or left incomplete by an interrupted save"
                entries.append(_unavailable(model_id, "checkpoint", run, reason, step=_step(path)))
                continue
            try:
                meta = read_meta(path, model_id)
                entry = _entry(run, path, meta, summary, final=latest is not None and path == latest)
            except UnusableModelError as exc:
                logger.warning("checkpoint %s is listed as unavailable: %s", path, exc)
                entry = _unavailable(model_id, "checkpoint", run, str(exc), step=_step(path))
            entries.append(entry)
        out = list(entries)
        if latest is not None:
            alias = next((e for e in entries if e["id"] == f"{run}@{latest.name}"), None)
            if alias is not None:
                out.append(dict(alias, id=run, kind="run", alias_of=alias["id"]))
        else:
            reason = "the run has no complete checkpoint yet"
            out.append(_unavailable(run, "run", run, reason))
        return out


def read_meta(path: Path, model_id: str) -> dict[str, Any]:
    """A checkpoint's metadata as a dict; UnusableModelError (naming the model id) if it cannot be read."""
    try:
        meta = read_metadata(path)
        if not isinstance(meta, dict):
            raise CheckpointError(f"{METADATA_FILE} holds a {type(meta).__name__}, not an object")
    except (CheckpointError, OSError, ValueError, TypeError, AttributeError) as exc:
        reason = str(exc).replace(str(path), model_id)  # no server paths in answers
        raise UnusableModelError(f"model={model_id!r} cannot be served: {reason}") from exc
    return meta


def _step_dirs(run_dir: Path) -> list[Path]:
    try:
        return sorted(p for p in (run_dir / "checkpoints").iterdir() if _STEP_DIR_RE.fullmatch(p.name))
    except OSError:
        return []


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def _step(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def _number(value: object, default: float | None) -> float | None:
    """A finite number from metadata, else default (metadata is data written by others: never trusted)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    value = float(value)
    return value if math.isfinite(value) else default


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _unavailable(model_id: str, kind: str, run: str, reason: str, step: int | None = None) -> dict[str, Any]:
    return {
        "id": model_id,
        "kind": kind,
        "run": run,
        "step": step,
        "created": 0,
        "available": False,
        "reason": reason,
    }


def _entry(
    run: str, path: Path, meta: dict[str, Any], summary: dict[str, Any] | None, final: bool
) -> dict[str, Any]:
    """One checkpoint's ModelInfo. Reward: the finished run's final evaluation for its last checkpoint,
    else the mean reward of the rollout of the epoch that wrote the checkpoint. Values of the wrong type or
    non-finite are left out (None), never passed on."""
    step = _step(path)
    metrics = meta.get("metrics")
    reward = _number(metrics.get(REWARD_KEY), None) if isinstance(metrics, dict) else None
    source = "checkpoint.metrics"
    final_eval = summary.get("final") if summary else None
    if final and summary and summary.get("epochs") == step and isinstance(final_eval, dict):
        reward, source = _number(final_eval.get("reward_mean"), None), "summary.final"
    config = meta.get("config")
    reward_cfg = config.get("reward") if isinstance(config, dict) else None
    reward_name = reward_cfg.get("name") if isinstance(reward_cfg, dict) else None
    base_model = meta.get("base_model")
    return {
        "id": f"{run}@{path.name}",
        "kind": "checkpoint",
        "run": run,
        "step": step,
        "created": int(_number(meta.get("created_at"), 0.0) or 0),
        "reward": reward,
        "reward_name": clean_text(reward_name) if isinstance(reward_name, str) else None,
        "reward_source": source if reward is not None else None,
        "base_model": clean_text(base_model) if isinstance(base_model, str) else None,
    }
