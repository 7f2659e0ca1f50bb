"""What a run writes while it goes: progress bar, TensorBoard scalars, sample grids, and at the end
summary.json and the reward curve. One reporter for both backends.

The epoch loop reports typed events (``LearnerStarted``, ``EpochDone``, ``CheckpointDone``, ``FinalDone``);
in one process it hands them straight to ``RunReporter.handle``, on Ray the learner sends them to the
driver, which hands them to the same method. Epochs re-run after a learner restart replace the earlier
record of the same epoch, so nothing is counted twice. Pure Python: no Ray here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from scoreaction.config import Config
from scoreaction.images import save_grid

logger = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "epoch",
    "rollout/reward_mean",
    "rollout/kl_mean",
    "rollout/objective",
    "samples",
    "reward_queries",
    "perf/epoch_s",
)
"""The per-epoch numbers kept in summary.json and the checkpoints' history (plus every monitor/* and eval/*)."""


def summary_record(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k in SUMMARY_KEYS or k.startswith(("monitor/", "eval/"))}


@dataclass
class LearnerStarted:
    """The learner (re)started at start_epoch; history: the summary records of the epochs before it."""

    start_epoch: int
    history: list[dict[str, Any]]


@dataclass
class EpochDone:
    """An epoch's metrics; grid: up to 16 of its images as uint8 (B, 3, H, W) when a grid is due."""

    metrics: dict[str, Any]
    grid: torch.Tensor | None = None


@dataclass
class CheckpointDone:
    """step_<step>/ was written and ``latest`` moved to it, after `seconds` of saving."""

    step: int
    path: str
    seconds: float


@dataclass
class FinalDone:
    """The final evaluation (summary.json's 'final'); grid as in EpochDone; reward_queries: all the run's
    queries of the optimised reward, the evaluation's included."""

    final: dict[str, Any]
    grid: torch.Tensor | None = None
    reward_queries: int = 0


@dataclass
class RunStopped:
    """The learner stopped the run on purpose (non-finite numbers); the driver raises the error again."""

    message: str
    kind: str
    epoch: int | None = None
    count: int = 0
    total: int = 0


Event = LearnerStarted | EpochDone | CheckpointDone | FinalDone | RunStopped


def grid_images(images: torch.Tensor | None) -> torch.Tensor | None:
    """Up to 16 images as uint8 (B, 3, H, W), small enough to send; None for samples that are not images."""
    if images is None or images.dim() != 4:
        return None
    return (images[:16].clamp(0, 1) * 255).round().to(torch.uint8)


@dataclass
class RunReporter:
    cfg: Config
    out: Path
    progress_bar: bool = True
    tensorboard: bool = True
    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    final: dict[str, Any] | None = None
    reward_queries: int = 0
    learner_starts: list[int] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    redone_epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self._tb = None
        self.bar = (
            tqdm(
                total=self.cfg.run.epochs,
                desc=f"{self.cfg.algorithm.name} on {self.cfg.run.preset or self.cfg.model.preset}",
                unit="epoch",
            )
            if self.progress_bar
            else None
        )

    @property
    def tb(self):
        if self._tb is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a declared dependency; keep going without it
                logger.warning("tensorboard is not installed: no TensorBoard scalars")
                self.tensorboard = False
                return None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        return self._tb

    def handle(self, event: Event) -> None:
        match event:
            case LearnerStarted():
                self._started(event)
            case EpochDone():
                self._epoch(event)
            case CheckpointDone():
                self.checkpoints.append(event.path)
                rec = self.history.get(event.step - 1)
                if rec is not None:
                    rec["perf/checkpoint_s"] = event.seconds
            case FinalDone():
                self.final = event.final
                self.reward_queries = event.reward_queries
                if event.grid is not None:
                    save_grid(event.grid.float() / 255.0, self.out / "samples" / "grid_final.png")
            case _:
                raise TypeError(f"the reporter does not handle {type(event).__name__}")

    def _started(self, event: LearnerStarted) -> None:
        self.learner_starts.append(event.start_epoch)
        for h in event.history:
            self.history.setdefault(int(h["epoch"]), dict(h))
        if self.bar is not None:
            self.bar.n = min(event.start_epoch, self.cfg.run.epochs)
            self.bar.refresh()

    def _epoch(self, event: EpochDone) -> None:
        m = dict(event.metrics)
        epoch = int(m["epoch"])
        new = epoch not in self.history
        if not new:
            self.redone_epochs.append(epoch)
        self.history[epoch] = m
        if event.grid is not None:
            save_grid(event.grid.float() / 255.0, self.out / "samples" / f"grid_epoch{epoch:04d}.png")
        if not new:
            return
        if self.tb is not None:
            for k, v in m.items():
                if k not in ("epoch", "samples") and isinstance(v, float | int) and math.isfinite(v):
                    self.tb.add_scalar(k, v, global_step=int(m["samples"]))
            self.tb.flush()
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{m['rollout/reward_mean']:.4g}", kl=f"{m['rollout/kl_mean']:.3g}")
            self.bar.update(1)

    def epochs(self) -> list[dict[str, Any]]:
        return [self.history[e] for e in sorted(self.history)]

    def write_summary(self, wall_s: float, backend: dict[str, Any]) -> dict[str, Any]:
        """summary.json and reward_curve.png; backend: what the backend adds ('backend' names it)."""
        epochs = self.epochs()
        summary = {
            "preset": self.cfg.model.preset,
            "algorithm": self.cfg.algorithm.name,
            "estimator": self.cfg.algorithm.estimator,
            "epochs": self.cfg.run.epochs,
            "samples": len(epochs) * self.cfg.run.num_samples,
            "reward_queries": self.reward_queries,
            "final": self.final,
            "per_epoch": [summary_record(m) for m in epochs],
            "wall_s": wall_s,
            **backend,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if epochs:
            plot_reward_curve(epochs, self.out / "reward_curve.png")
        return summary

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._tb is not None:
            self._tb.close()


def plot_reward_curve(history: list[dict[str, Any]], path: Path) -> Path:
    """Reward mean (and every monitor and per-epoch evaluation) against samples seen, with the KL below, as a
    PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [m["samples"] for m in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[2, 1])
    top.plot(xs, [m["rollout/reward_mean"] for m in history], "o-", label="reward (optimised)")
    keys = {k for m in history for k in m}
    for key in sorted(
        k for k in keys if k.startswith("monitor/") or (k.startswith("eval/") and "reward" in k)
    ):
        top.plot(xs, [m.get(key, math.nan) for m in history], "s--", label=key)
    top.set_ylabel("mean reward of the epoch's rollouts")
    top.legend(loc="best", fontsize=8)
    top.grid(alpha=0.3)
    bottom.plot(xs, [m["rollout/kl_mean"] for m in history], "o-", color="tab:red")
    bottom.set_ylabel("KL to the base model")
    bottom.set_xlabel("samples")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
