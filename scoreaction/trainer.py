"""The single-process fine-tuning loop: rollout -> reward -> value update -> policy update, per epoch.

The distributed loop (Ray actors + Ray Train) runs the same pieces; this one is the reference it is
measured against, and what ``jobs/finetune.py --single-process`` runs in one process. Both write the same
training checkpoints through ``scoreaction.run_folder`` (one owner per run folder, one ``latest``), and
``fit(resume=True)`` continues a run from its newest complete checkpoint exactly as if it had not stopped:
the policy, both optimisers and the lr schedule, F_phi, the DDPO stat tracker, the sampler's and the
learner's random generators and the running reward normaliser are all checkpointed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scoreaction.checkpoint import load_checkpoint
from scoreaction.config import Config
from scoreaction.images import save_grid
from scoreaction.learner import Batch, Learner, reward_of_x0_hat
from scoreaction.models.toy_gmm import ToyPolicy
from scoreaction.policy import DiffusionPolicy
from scoreaction.rewards import build_monitors, build_reward
from scoreaction.run_folder import (
    RunFolder,
    load_reward_stats,
    open_run,
    publish_latest,
    read_training_checkpoint,
    reward_stats_state,
    write_training_checkpoint,
)
from scoreaction.sampling import Policy, Trajectory, sample_trajectories
from scoreaction.value import ValueFunction

logger = logging.getLogger(__name__)


def build_policy(cfg: Config) -> Policy:
    if cfg.model.preset == "toy-gmm":
        return ToyPolicy(cfg.model.toy, cfg.policy, seed=cfg.run.seed)
    return DiffusionPolicy.from_config(cfg.model, cfg.policy)


def build_value_function(cfg: Config, policy: Policy) -> ValueFunction:
    shape = policy.latent_shape(cfg.sampler.height, cfg.sampler.width)
    embed_dim = int(policy.encode_prompts([""]).shape[-1])
    torch.manual_seed(cfg.run.seed + 2)
    return ValueFunction(shape, embed_dim, cfg.value.hidden, cfg.value.use_reward_prior).to(policy.device)


def epoch_prompts(cfg: Config, epoch: int, num_samples: int | None = None) -> list[str]:
    """The prompts of an epoch, round robin over run.prompts (the distributed rollout workers use the same)."""
    ps, n = cfg.run.prompts, cfg.run.num_samples
    return [ps[(epoch * n + i) % len(ps)] for i in range(n)][: num_samples or n]


class Trainer:
    """Owns the policy, reward, value function and learner of one run."""

    def __init__(self, cfg: Config, output_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.out = Path(output_dir or cfg.run.output_dir)
        torch.manual_seed(cfg.run.seed)
        self.policy = build_policy(cfg)
        self.reward_queries = 0  # images/states scored by the optimised reward (x0_hat priors included)
        self._reward = build_reward(cfg.reward)
        # held-out rewards (reward.monitor): logged as monitor/<name>_mean, never optimised
        self.monitors = build_monitors(cfg.reward)
        self.monitor_means: dict[str, float] = {}
        self.value_fn = build_value_function(cfg, self.policy)
        self.learner = Learner(self.policy, self.value_fn, cfg)
        self.learner.reward_fn = self.reward_fn
        self.generator = torch.Generator(device=self.policy.device).manual_seed(cfg.run.seed)
        self.history: list[dict] = []
        self.samples_seen = 0

    def reward_fn(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The optimised reward, counting every query (the sample-efficiency benchmarks report them)."""
        self.reward_queries += len(prompts)
        return self._reward(images, prompts)

    @property
    def is_image(self) -> bool:
        return not isinstance(self.policy, ToyPolicy)

    def rollout(self, epoch: int, num_samples: int | None = None) -> Batch:
        """Sample the epoch's trajectories (with the reference KL) and score them."""
        prompts = epoch_prompts(self.cfg, epoch, num_samples)
        bs = self.cfg.sampler.batch_size
        parts = [
            sample_trajectories(
                self.policy, prompts[i : i + bs], self.cfg.sampler, self.generator, record_reference=True
            ).to("cpu")
            for i in range(0, len(prompts), bs)
        ]
        traj = Trajectory.cat(parts)
        rewards = self.reward_fn(traj.images, traj.prompts).float().cpu()
        self.monitor_means = {
            f"monitor/{name}_mean": float(fn(traj.images, traj.prompts).float().mean())
            for name, fn in self.monitors.items()
        }
        r_x0 = reward_of_x0_hat(self.policy, traj, self.reward_fn) if self.cfg.scores_x0_hat else None
        return Batch(traj, rewards, r_x0)

    def pretrain_value(self) -> None:
        """Fit F_phi on rollouts of the frozen (initial) policy before fine-tuning (ctrl: ddpo has no value)."""
        for i in range(self.cfg.value.pretrain_epochs if self.cfg.uses_value else 0):
            metrics = self.learner.update_value(self.rollout(-1 - i), epoch=-1 - i)
            logger.info("value pretraining %d: %s", i, metrics)

    def epoch(self, epoch: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batch = self.rollout(epoch)
        t_rollout = time.perf_counter() - t0
        kl_sum = batch.traj.extras["kl"].sum(1)
        reward_mean, kl_mean = float(batch.rewards.mean()), float(kl_sum.mean())
        metrics: dict[str, float] = {
            "epoch": epoch,
            "rollout/reward_mean": reward_mean,
            "rollout/reward_std": float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0,
            "rollout/kl_mean": kl_mean,
            "rollout/objective": reward_mean - self.cfg.algorithm.kl_coef * kl_mean,
            **self.monitor_means,
        }
        t1 = time.perf_counter()
        if self.cfg.uses_value and self.cfg.value.updates_per_epoch > 0:
            metrics.update(self.learner.update_value(batch, epoch=epoch))
        t2 = time.perf_counter()
        metrics.update(self.learner.update_policy(batch, epoch=epoch))
        t3 = time.perf_counter()
        self.samples_seen += batch.traj.batch_size
        metrics.update(
            {
                "perf/rollout_s": t_rollout,
                "perf/value_s": t2 - t1,
                "perf/policy_s": t3 - t2,
                "perf/epoch_s": t3 - t0,
                "samples": self.samples_seen,
                "reward_queries": self.reward_queries,
            }
        )
        if self.is_image and (epoch % self.cfg.run.grid_every == 0):
            save_grid(batch.traj.images[:16], self.out / "samples" / f"grid_epoch{epoch:04d}.png")
        return metrics

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------

    def training_state(self) -> dict:
        """Everything besides the policy weights that the run's numbers depend on (the distributed learner
        writes the same layout: per-rank tracker and generator under 'ranks')."""
        state = self.learner.state_dict()
        state["ranks"] = [{"tracker": state.pop("tracker"), "generator": state.pop("generator")}]
        state["reward_stats"] = reward_stats_state(self._reward)
        state["rollout_generator"] = self.generator.get_state()
        state["torch_rng"] = torch.get_rng_state()
        return state

    def save(self, folder: RunFolder, step: int, metrics: dict[str, float] | None = None) -> Path:
        """Write step_<step>/ with the training state and move ``latest`` to it (refused, with nothing
        written, if any tensor is non-finite or this job no longer owns the folder)."""
        progress = {
            "epoch": step,
            "samples": self.samples_seen,
            "reward_queries": self.reward_queries,
            "history": self.history,
            "world_size": 1,
            "backend": "single-process",
        }
        kept = {k: v for k, v in (metrics or {}).items() if not k.startswith("perf/")}
        path = write_training_checkpoint(
            folder.checkpoint_dir,
            step,
            self.policy,
            self.training_state(),
            progress,
            self.cfg.model_dump(),
            kept,
        )
        folder.lock.check()
        publish_latest(folder.checkpoint_dir, path, self.cfg.run.keep_checkpoints)
        return path

    def restore(self, path: Path) -> int:
        """Load a training checkpoint; returns the epoch to continue from."""
        load_checkpoint(self.policy, path)
        state, progress = read_training_checkpoint(path)
        ranks = state.pop("ranks")
        state.update(ranks[0])
        load_reward_stats(self._reward, state.pop("reward_stats", None))
        rollout_generator = state.pop("rollout_generator", None)
        torch_rng = state.pop("torch_rng", None)
        if rollout_generator is not None:
            self.generator.set_state(rollout_generator)
        else:
            logger.warning(
                "%s was written by the distributed learner: the single-process sampler's noise continues from "
                "a fresh generator, so the resumed epochs are not those the distributed run would sample",
                path,
            )
        if torch_rng is not None:
            torch.set_rng_state(torch_rng)
        self.learner.load_state_dict(state)
        self.history = list(progress.get("history", []))
        self.samples_seen = int(progress.get("samples", 0))
        self.reward_queries = int(progress.get("reward_queries", 0))
        logger.info("resumed from %s at epoch %d", path, progress["epoch"])
        return int(progress["epoch"])

    def fit(self, progress: Callable[[dict], None] | None = None, resume: bool = False) -> dict:
        """Run the epochs (after the checkpoint's, with resume=True) and write summary.json.

        Owns the run folder while it runs: a second job on it is refused, and a folder that already holds a
        run's checkpoints is refused unless resume=True."""
        start = time.perf_counter()
        folder = open_run(self.cfg, self.out, resume)
        try:
            return self._fit(folder, progress, start)
        finally:
            folder.close()

    def _fit(self, folder: RunFolder, progress: Callable[[dict], None] | None, start: float) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        first = self.restore(folder.resume_from) if folder.resume_from is not None else 0
        if first == 0:
            self.pretrain_value()
        for epoch in range(first, self.cfg.run.epochs):
            metrics = self.epoch(epoch)
            self.history.append(metrics)
            if progress:
                progress(metrics)
            last = epoch == self.cfg.run.epochs - 1
            if (epoch + 1) % self.cfg.run.checkpoint_every == 0 or last:
                self.save(folder, epoch + 1, metrics)
        if self.cfg.run.epochs == 0 and folder.resume_from is None:
            self.save(folder, 0)
        final = self.evaluate_now()
        summary = {
            "preset": self.cfg.model.preset,
            "algorithm": self.cfg.algorithm.name,
            "estimator": self.cfg.algorithm.estimator,
            "epochs": self.cfg.run.epochs,
            "samples": self.samples_seen,
            "reward_queries": self.reward_queries,
            "final": final,
            "per_epoch": [
                {
                    k: m[k]
                    for k in (
                        "epoch",
                        "rollout/reward_mean",
                        "rollout/kl_mean",
                        "rollout/objective",
                        "samples",
                        "reward_queries",
                        "perf/epoch_s",
                        *self.monitor_means,
                    )
                }
                for m in self.history
            ],
            "wall_s": time.perf_counter() - start,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.history:
            plot_reward_curve(self.history, self.out / "reward_curve.png")
        return summary

    @torch.no_grad()
    def evaluate_now(self) -> dict[str, float]:
        """Reward and KL of the current policy on a fresh batch (the 'final' entry of summary.json)."""
        batch = self.rollout(self.cfg.run.epochs + 10_000)
        kl = batch.traj.extras["kl"].sum(1)
        if self.is_image:
            save_grid(batch.traj.images[:16], self.out / "samples" / "grid_final.png")
        return {
            "reward_mean": float(batch.rewards.mean()),
            "kl_mean": float(kl.mean()),
            "objective": float(batch.rewards.mean()) - self.cfg.algorithm.kl_coef * float(kl.mean()),
            "num_samples": batch.traj.batch_size,
            **self.monitor_means,
        }


def plot_reward_curve(history: list[dict], path: Path) -> Path:
    """Reward mean (and KL) against samples seen, as a PNG (drawn with PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw

    xs = [m["samples"] for m in history]
    ys = [m["rollout/reward_mean"] for m in history]
    w, h, pad = 640, 400, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x, y):
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad), h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    draw.rectangle([pad, pad, w - pad, h - pad], outline="black")
    pts = [px(x, y) for x, y in zip(xs, ys, strict=True)]
    if len(pts) > 1:
        draw.line(pts, fill="blue", width=2)
    for p in pts:
        draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill="blue")
    draw.text((pad, 15), f"rollout/reward_mean vs samples ({y0:.3g} .. {y1:.3g})", fill="black")
    draw.text((pad, h - pad + 10), f"samples {x0} .. {x1}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
