"""What the driver writes while a distributed run goes: progress bar, TensorBoard scalars, sample grids,
and at the end summary.json and the reward curve (the same files as the single-process Trainer).

Events come from the learner (``MetricsSink``); epochs re-run after a learner restart replace the earlier
record of the same epoch, so nothing is counted twice. Pure Python: no Ray here.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tqdm import tqdm

from scoreaction.config import Config
from scoreaction.images import save_grid
from scoreaction.trainer import plot_reward_curve

logger = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "epoch",
    "rollout/reward_mean",
    "rollout/kl_mean",
    "rollout/objective",
    "samples",
    "perf/epoch_s",
)


class RunReporter:
    def __init__(self, cfg: Config, out: Path, progress_bar: bool = True, tensorboard: bool = True) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.history: dict[int, dict[str, Any]] = {}
        self.final: dict[str, float] | None = None
        self.learner_starts: list[int] = []
        self.checkpoints: list[str] = []
        self.redone_epochs: list[int] = []
        self._tb = None
        self._tb_enabled = tensorboard
        self.bar = (
            tqdm(total=cfg.run.epochs, desc=f"{cfg.algorithm.name} on {cfg.model.preset}", unit="epoch")
            if progress_bar
            else None
        )

    @property
    def tb(self):
        if self._tb is None and self._tb_enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a declared dependency; keep going without it
                logger.warning("tensorboard is not installed: no TensorBoard scalars")
                self._tb_enabled = False
                return None
            self._tb = SummaryWriter(str(self.out / "tensorboard"))
        return self._tb

    def handle(self, kind: str, payload: dict[str, Any]) -> None:
        getattr(self, f"_on_{kind}")(payload)

    def _on_start(self, p: dict[str, Any]) -> None:
        self.learner_starts.append(int(p["start_epoch"]))
        for h in p["history"]:
            self.history.setdefault(int(h["epoch"]), dict(h))
        if self.bar is not None:
            self.bar.n = min(p["start_epoch"], self.cfg.run.epochs)
            self.bar.refresh()

    def _on_epoch(self, p: dict[str, Any]) -> None:
        p = dict(p)
        grid = p.pop("grid", None)
        epoch = int(p["epoch"])
        new = epoch not in self.history
        if not new:
            self.redone_epochs.append(epoch)
        self.history[epoch] = p
        if grid is not None:
            save_grid(grid.float() / 255.0, self.out / "samples" / f"grid_epoch{epoch:04d}.png")
        if new:
            if self.tb is not None:
                for k, v in p.items():
                    if k not in ("epoch", "samples") and isinstance(v, float | int) and math.isfinite(v):
                        self.tb.add_scalar(k, v, global_step=int(p["samples"]))
                self.tb.flush()
            if self.bar is not None:
                self.bar.set_postfix(
                    reward=f"{p['rollout/reward_mean']:.4g}", kl=f"{p['rollout/kl_mean']:.3g}"
                )
                self.bar.update(1)

    def _on_perf(self, p: dict[str, Any]) -> None:
        rec = self.history.get(int(p["epoch"]))
        if rec is not None:
            rec.update({k: v for k, v in p.items() if k != "epoch"})

    def _on_checkpoint(self, p: dict[str, Any]) -> None:
        self.checkpoints.append(p["path"])

    def _on_final(self, p: dict[str, Any]) -> None:
        self.final = p["final"]
        if p.get("grid") is not None:
            save_grid(p["grid"].float() / 255.0, self.out / "samples" / "grid_final.png")

    def epochs(self) -> list[dict[str, Any]]:
        return [self.history[e] for e in sorted(self.history)]

    def write_summary(self, wall_s: float, extra: dict[str, Any]) -> dict[str, Any]:
        """summary.json (the single-process Trainer's fields plus 'distributed') and reward_curve.png."""
        epochs = self.epochs()
        summary = {
            "preset": self.cfg.model.preset,
            "algorithm": self.cfg.algorithm.name,
            "estimator": self.cfg.algorithm.estimator,
            "epochs": self.cfg.run.epochs,
            "samples": len(epochs) * self.cfg.run.num_samples,
            "final": self.final,
            "per_epoch": [{k: m[k] for k in SUMMARY_KEYS if k in m} for m in epochs],
            "wall_s": wall_s,
            "distributed": {
                "learner_starts_at_epoch": self.learner_starts,
                "redone_epochs": self.redone_epochs,
                **extra,
            },
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
