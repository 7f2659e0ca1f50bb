"""The learner as a Ray Train function: one long-lived ``TorchTrainer.fit()`` for the whole run.

Every rank builds the policy, value function and ``Learner`` (the single-process code, unchanged); rank 0
also drives the rollout and reward actors (``EpochRunner``). Per epoch:

1. rank 0 starts the rollouts and their scoring, waits, and broadcasts the epoch's ObjectRefs;
2. every rank fetches the scored batch and takes its 1/world shard;
3. value update, then policy update, gradients averaged over ranks (``ddp.GradientAllReduce``);
4. rank 0 publishes the new policy weights to the rollout workers and sends the metrics to the driver;
5. every ``run.checkpoint_every`` epochs (and at the end) rank 0 writes a training checkpoint and
   ``ray.train.report(..., checkpoint=...)`` registers it; then ``latest`` moves to it.

On a restart (Ray Train FailureConfig, or ``--resume``) the function starts from the newest complete
checkpoint and re-runs the epochs after it: rollout noise depends only on (seed, epoch, batch), so the
re-run epochs are the ones that were lost, not new ones, and the driver replaces their metrics.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.collective
import torch

from scoreaction.checkpoint import load_checkpoint
from scoreaction.config import Config
from scoreaction.distributed.controller import EpochRunner, fetch_batch, shard, shard_rows
from scoreaction.distributed.ddp import GradientAllReduce, broadcast_tensors, gather_objects, mean_over_ranks
from scoreaction.distributed.faults import maybe_fail
from scoreaction.distributed.reporter import SUMMARY_KEYS
from scoreaction.distributed.workers import EVAL_EPOCH_OFFSET, set_threads
from scoreaction.learner import Batch, Learner, NonFiniteError
from scoreaction.rewards import build_reward
from scoreaction.run_folder import (
    NonFiniteCheckpointError,
    check_finite,
    clean_leftovers,
    latest_step_dir,
    load_reward_stats,
    publish_latest,
    read_training_checkpoint,
    reward_stats_state,
    verify_owner,
    write_training_checkpoint,
)
from scoreaction.trainer import build_policy, build_value_function

logger = logging.getLogger(__name__)


def rollout_metrics(batch: Batch, kl_coef: float) -> dict[str, float]:
    kl = batch.traj.extras["kl"].sum(1)
    reward_mean, kl_mean = float(batch.rewards.mean()), float(kl.mean())
    return {
        "rollout/reward_mean": reward_mean,
        "rollout/reward_std": float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0,
        "rollout/kl_mean": kl_mean,
        "rollout/objective": reward_mean - kl_coef * kl_mean,
    }


def grid_images(batch: Batch) -> torch.Tensor | None:
    """Up to 16 terminal images as uint8 (B, 3, H, W) for the driver's sample grid; None for the toy."""
    images = batch.traj.images
    if images is None or images.dim() != 4:
        return None
    return (images[:16].clamp(0, 1) * 255).round().to(torch.uint8)


class LearnerLoop:
    """State of one learner rank; ``run`` is the whole fit."""

    def __init__(self, config: dict[str, Any]) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.cfg = Config.model_validate(config["cfg"])
        set_threads(config.get("threads"))
        self.faults = config.get("faults")
        self.sink = config["sink"]
        self.checkpoint_dir = Path(config["checkpoint_dir"])
        self.run_id = config.get("run_id")  # the driver's lock on the run folder
        torch.manual_seed(self.cfg.run.seed)
        self.policy = build_policy(self.cfg)
        self.value_fn = build_value_function(self.cfg, self.policy)
        shard_cfg = self.cfg.model_copy(deep=True)
        shard_cfg.algorithm.micro_batch_size = self.cfg.algorithm.micro_batch_size // self.world
        self.learner = Learner(self.policy, self.value_fn, shard_cfg)
        self.learner.reward_fn = build_reward(self.cfg.reward)
        self.runner = (
            EpochRunner(self.cfg, config["rollout_workers"], config["reward_workers"])
            if self.rank == 0
            else None
        )
        self.start_epoch, self.history = self._restore()
        self.grad_sync = [
            GradientAllReduce(self.policy.trainable_parameters()),
            GradientAllReduce(list(self.value_fn.parameters())),
        ]

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------

    def _restore(self) -> tuple[int, list[dict]]:
        """Load the newest complete checkpoint (Ray Train's after a restart, or ``latest``)."""
        if self.rank == 0 and ray.train.get_checkpoint() is not None:
            clean_leftovers(self.checkpoint_dir)  # a restart: what the dead rank 0 was writing
        candidates = [latest_step_dir(self.checkpoint_dir)]
        ray_ckpt = ray.train.get_checkpoint()
        if ray_ckpt is not None:
            candidates.append(Path(ray_ckpt.path))
        best, best_epoch = None, -1
        for path in candidates:
            if path is None or not (path / "progress.json").is_file():
                continue
            _, progress = read_training_checkpoint(path)
            if progress["epoch"] > best_epoch:
                best, best_epoch = path, progress["epoch"]
        if best is None:
            broadcast_tensors(self.policy.trainable_parameters() + list(self.value_fn.parameters()))
            return 0, []
        load_checkpoint(self.policy, best)
        state, progress = read_training_checkpoint(best)
        ranks = state.pop("ranks")
        state.update(ranks[self.rank % len(ranks)])
        load_reward_stats(self.learner.reward_fn, state.pop("reward_stats", None))
        for key in ("rollout_generator", "torch_rng"):  # the single-process sampler's: not used here
            state.pop(key, None)
        self.learner.load_state_dict(state)
        logger.info("rank %d resumed from %s at epoch %d", self.rank, best, progress["epoch"])
        return progress["epoch"], progress["history"]

    def _checkpoint(self, epoch_done: int, metrics: dict[str, float]) -> float:
        """Write step_<epoch_done>/ (rank 0), register it with Ray Train, then move ``latest``."""
        t0 = time.perf_counter()
        state = self.learner.state_dict()
        # every rank holds the same weights: all refuse non-finite ones together (no rank left waiting)
        check_finite(self.policy, {**state, "reward_stats": reward_stats_state(self.learner.reward_fn)})
        mine = {"tracker": state.pop("tracker"), "generator": state.pop("generator").tolist()}
        ranks = gather_objects(mine)
        if self.rank != 0:
            ray.train.report({"epoch": epoch_done})
            return time.perf_counter() - t0
        state["ranks"] = [
            {"tracker": r["tracker"], "generator": torch.tensor(r["generator"], dtype=torch.uint8)}
            for r in ranks
        ]
        state["reward_stats"] = reward_stats_state(self.learner.reward_fn)
        progress = {
            "epoch": epoch_done,
            "samples": epoch_done * self.cfg.run.num_samples,
            "history": self.history,
            "world_size": self.world,
            "backend": "distributed",
        }
        kept = {k: v for k, v in metrics.items() if not k.startswith("perf/")}
        path = write_training_checkpoint(
            self.checkpoint_dir,
            epoch_done,
            self.policy,
            state,
            progress,
            self.cfg.model_dump(),
            kept,
            before_publish=lambda: maybe_fail(self.faults, "save", epoch_done, 0),
        )
        verify_owner(self.checkpoint_dir.parent, self.run_id)
        ray.train.report(
            {"epoch": epoch_done, **{k: v for k, v in kept.items() if isinstance(v, float | int)}},
            checkpoint=ray.train.Checkpoint(str(path)),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )
        publish_latest(self.checkpoint_dir, path, self.cfg.run.keep_checkpoints)
        self.sink.push.remote("checkpoint", {"epoch": epoch_done - 1, "path": str(path)})
        return time.perf_counter() - t0

    # ----------------------------------------------------------------------------------------------
    # Epochs
    # ----------------------------------------------------------------------------------------------

    def _scored_batch(self, epoch: int, num_samples: int | None = None) -> tuple[Batch, dict[str, float]]:
        """Rank 0 runs the rollouts and scoring; every rank gets the whole scored batch."""
        timings: dict[str, float] = {}
        payload = None
        if self.rank == 0:
            refs = self.runner.wait(self.runner.submit(epoch, num_samples))
            timings.update({k: v for k, v in refs.timings.items() if k.startswith("perf/")})
            payload = (refs.trajectories, refs.scores)
        if self.world > 1:
            payload = ray.train.collective.broadcast_from_rank_zero(payload)
        t0 = time.perf_counter()
        batch = fetch_batch(*payload, reward_fn=self.learner.reward_fn)
        timings["perf/fetch_s"] = time.perf_counter() - t0
        return batch, timings

    def _publish(self) -> float:
        return self.runner.publish(self.policy.trainable_state_dict()) if self.rank == 0 else 0.0

    def _shard_advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's rows of the advantages normalised over the whole batch (every rank holds the same
        value function after the all-reduced value update, and the same DDPO tracker), so N learner
        workers take the step one would. None for the value-gradient estimator (no advantages)."""
        alg = self.cfg.algorithm
        if self.world == 1 or (alg.name == "ctrl" and alg.estimator == "value_gradient"):
            return None
        adv, std = self.learner.advantages(batch)
        return adv[shard_rows(batch.traj.batch_size, self.rank, self.world)], std

    def pretrain_value(self) -> None:
        for i in range(self.cfg.value.pretrain_epochs if self.cfg.uses_value else 0):
            batch, _ = self._scored_batch(-1 - i)
            metrics = mean_over_ranks(
                self.learner.update_value(shard(batch, self.rank, self.world), epoch=-1 - i)
            )
            logger.info("value pretraining %d: %s", i, metrics)

    def epoch(self, epoch: int) -> dict[str, float]:
        t0 = time.perf_counter()
        batch, metrics = self._scored_batch(epoch)
        maybe_fail(self.faults, "learner", epoch, self.rank)  # mid-epoch: rollouts done, update not
        local = shard(batch, self.rank, self.world)
        t1 = time.perf_counter()
        learned: dict[str, float] = {}
        if self.cfg.uses_value and self.cfg.value.updates_per_epoch > 0:
            learned.update(self.learner.update_value(local, epoch=epoch))
        t2 = time.perf_counter()
        learned.update(self.learner.update_policy(local, self._shard_advantages(batch), epoch=epoch))
        t3 = time.perf_counter()
        sync_s = self._publish()
        t4 = time.perf_counter()
        metrics.update(mean_over_ranks(learned))
        metrics.update(rollout_metrics(batch, self.cfg.algorithm.kl_coef))
        busy = sum(metrics.get(k, 0.0) for k in ("perf/rollout_s", "perf/reward_wait_s", "perf/fetch_s"))
        metrics.update(
            {
                "epoch": epoch,
                "samples": (epoch + 1) * self.cfg.run.num_samples,
                "perf/value_s": t2 - t1,
                "perf/policy_s": t3 - t2,
                "perf/weight_sync_s": sync_s,
                "perf/epoch_s": t4 - t0,
                "perf/idle_s": max(0.0, (t4 - t0) - busy - (t3 - t1) - sync_s),
            }
        )
        if self.rank == 0:
            grid = grid_images(batch) if epoch % self.cfg.run.grid_every == 0 else None
            self.sink.push.remote("epoch", {**metrics, "grid": grid})
        return metrics

    def evaluate(self) -> None:
        """Reward and KL of the final policy on a fresh batch (summary.json's 'final')."""
        batch, _ = self._scored_batch(self.cfg.run.epochs + EVAL_EPOCH_OFFSET)
        if self.rank == 0:
            m = rollout_metrics(batch, self.cfg.algorithm.kl_coef)
            final = {
                "reward_mean": m["rollout/reward_mean"],
                "kl_mean": m["rollout/kl_mean"],
                "objective": m["rollout/objective"],
                "num_samples": batch.traj.batch_size,
            }
            self.sink.push.remote("final", {"final": final, "grid": grid_images(batch)})

    def run(self) -> None:
        """The whole fit; non-finite numbers stop the run (no Ray Train retry: it would hit them again) with
        the last good checkpoint in place, and the driver raises the NonFiniteError."""
        try:
            self._run()
        except (NonFiniteError, NonFiniteCheckpointError) as exc:
            logger.error("rank %d: %s", self.rank, exc)
            if self.rank == 0:
                fatal = {"message": str(exc), "kind": getattr(exc, "kind", "checkpoint")}
                fatal.update({k: getattr(exc, k, None) for k in ("count", "total")})
                ray.get(self.sink.push.remote("fatal", {**fatal, "at_epoch": getattr(exc, "epoch", None)}))
        finally:
            for s in self.grad_sync:
                s.remove()

    def _run(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            self.sink.push.remote("start", {"start_epoch": self.start_epoch, "history": self.history})
        self._publish()
        if self.start_epoch == 0:
            self.pretrain_value()
        for epoch in range(self.start_epoch, cfg.run.epochs):
            metrics = self.epoch(epoch)
            self.history = [h for h in self.history if h["epoch"] < epoch]
            self.history.append({k: metrics[k] for k in SUMMARY_KEYS})
            last = epoch == cfg.run.epochs - 1
            if (epoch + 1) % cfg.run.checkpoint_every == 0 or last:
                seconds = self._checkpoint(epoch + 1, metrics)
                if self.rank == 0:
                    self.sink.push.remote("perf", {"epoch": epoch, "perf/checkpoint_s": seconds})
        if cfg.run.epochs == 0 and self.start_epoch == 0:
            self._checkpoint(0, {})
        self.evaluate()


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train function (``TorchTrainer(train_loop, train_loop_config=...)``)."""
    LearnerLoop(config).run()
