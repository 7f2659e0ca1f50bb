"""The epoch loop, written once for both backends.

Per epoch, as the method reads (README, "The method in code"):

    prompts -> rollouts -> scores          Rollouts.scored (scoring overlaps sampling on Ray)
    value update                           Learner.update_value   (ctrl)
    advantages -> policy update            Learner.update_policy  (whole-batch advantages, own shard)
    publish weights                        Rollouts.publish
    report                                 EpochDone -> RunReporter (progress, TensorBoard, grids, summary)
    checkpoint                             every run.checkpoint_every epochs and at the end

``EpochLoop`` runs on every learner rank. In one process (``scoreaction.trainer``) there is one rank, the
rollouts are ``LocalRollouts`` and the events go straight to the reporter; on Ray
(``scoreaction.distributed``) each Ray Train rank runs it with ``RayRollouts`` (rank 0 drives the rollout and
reward actors and every rank receives the scored batch), the gradient all-reduce hooks of
``scoreaction.ddp``, and rank 0's events travel to the driver's reporter. The collectives used here
(``mean_over_ranks``, ``sum_over_ranks``, ``gather_objects``) are the identity in one process.

Checkpoints are one format (``scoreaction.run_folder``) with one ``latest``: a run continues from the newest
complete one exactly as if it had not stopped, since rollout noise depends only on (seed, epoch, batch) and
the learner's state (optimisers, lr schedule, F_phi, DDPO tracker, its generator, the running reward
normaliser) is all in the checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scoreaction.builders import build_policy, build_value_function
from scoreaction.checkpoint import load_checkpoint
from scoreaction.config import Config
from scoreaction.ddp import gather_objects, mean_over_ranks, sum_over_ranks
from scoreaction.faults import FaultPlan, maybe_fail
from scoreaction.learner import Learner
from scoreaction.reporter import (
    CheckpointDone,
    EpochDone,
    Event,
    FinalDone,
    LearnerStarted,
    grid_images,
    summary_record,
)
from scoreaction.rewards import RewardFn, build_reward
from scoreaction.rollouts import Rollouts
from scoreaction.run_folder import (
    check_finite,
    latest_step_dir,
    load_reward_stats,
    publish_latest,
    read_training_checkpoint,
    reward_stats_state,
    verify_owner,
    write_training_checkpoint,
)
from scoreaction.scoring import Batch

logger = logging.getLogger(__name__)

EVAL_EPOCH_OFFSET = 10_000
"""Rollouts of the final evaluation are those of epoch run.epochs + EVAL_EPOCH_OFFSET: noise no training
epoch uses."""
FIXED_EVAL_EPOCH = -(1 << 19)
"""The per-epoch evaluation set (run.eval_num_steps) is rollout epoch FIXED_EVAL_EPOCH: the same prompts and
starting noise every time, and none that training or value pre-training samples."""


class LearnerHooks:
    """What a backend adds around the loop's checkpoints. In one process: nothing."""

    backend = "in-process"

    def resume_candidates(self) -> list[Path]:
        """Checkpoints to consider besides ``latest`` (Ray Train's, after a restart)."""
        return []

    def checkpoint_written(self, step: int, path: Path | None, metrics: dict[str, Any]) -> None:
        """Every rank, after rank 0 wrote step_<step>/ (path None on the other ranks), before ``latest``
        moves to it."""


def rollout_metrics(batch: Batch, kl_coef: float) -> dict[str, float]:
    """kl_mean: the discrete path KL (sum of the exact per-step KLs, what the objective penalises);
    kl_continuous: the continuous-time path KL estimated on the sampling grid (comparable across step counts)."""
    kl = batch.traj.extras["kl"].sum(1)
    reward_mean, kl_mean = float(batch.rewards.mean()), float(kl.mean())
    return {
        "rollout/reward_mean": reward_mean,
        "rollout/reward_std": float(batch.rewards.std()) if batch.rewards.numel() > 1 else 0.0,
        "rollout/kl_mean": kl_mean,
        "rollout/kl_continuous": float(batch.traj.extras["kl_continuous"].sum(1).mean()),
        "rollout/objective": reward_mean - kl_coef * kl_mean,
    }


def _no_report(event: Event) -> None:
    pass


class EpochLoop:
    """One learner rank's policy, value function, reward and Learner, and the epochs of the run.

    rollouts: called once with this loop, returns where its scored rollouts come from.
    reward_factory: cfg -> the optimised reward, instead of build_reward (benchmarks, tests)."""

    def __init__(
        self,
        cfg: Config,
        checkpoint_dir: str | Path,
        rollouts: Callable[[EpochLoop], Rollouts],
        *,
        rank: int = 0,
        world: int = 1,
        run_id: str | None = None,
        faults: FaultPlan | None = None,
        hooks: LearnerHooks | None = None,
        reward_factory: Callable[[Config], RewardFn] | None = None,
    ) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_id, self.faults, self.hooks = run_id, faults, hooks or LearnerHooks()
        torch.manual_seed(cfg.run.seed)
        self.policy = build_policy(cfg)
        self.value_fn = build_value_function(cfg, self.policy)
        self.reward_fn = reward_factory(cfg) if reward_factory else build_reward(cfg.reward)
        self.learner = Learner(self.policy, self.value_fn, cfg, self.reward_fn, rank=rank, world=world)
        self.rollouts = rollouts(self)
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []  # summary records of the epochs done
        self.reward_queries = 0  # images and states the optimised reward scored for training
        self.report: Callable[[Event], None] = _no_report

    # ----------------------------------------------------------------------------------------------
    # The run
    # ----------------------------------------------------------------------------------------------

    def run(self, report: Callable[[Event], None] | None = None) -> dict[str, Any]:
        """The whole fit from the newest checkpoint (or the start), then the final evaluation; returns it.
        report: where rank 0's events go (the other ranks report nothing)."""
        self.report = report if report is not None and self.rank == 0 else _no_report
        self.restore()
        self.report(LearnerStarted(self.start_epoch, list(self.history)))
        self.rollouts.publish(self.policy)
        if self.start_epoch == 0:
            self.pretrain_value()
        for epoch in range(self.start_epoch, self.cfg.run.epochs):
            metrics = self.epoch(epoch)
            if (epoch + 1) % self.cfg.run.checkpoint_every == 0 or epoch == self.cfg.run.epochs - 1:
                self.save(epoch + 1, metrics)
        if self.cfg.run.epochs == 0 and self.start_epoch == 0:
            self.save(0, {})
        return self.evaluate()

    def rollout(self, epoch: int, num_samples: int | None = None) -> Batch:
        """The epoch's scored batch (sampled with the current weights)."""
        return self.rollouts.scored(epoch, num_samples).batch

    def pretrain_value(self) -> None:
        """Fit F_phi on rollouts of the frozen (initial) policy before fine-tuning (ctrl: ddpo has no value)."""
        for i in range(self.cfg.value.pretrain_epochs if self.cfg.uses_value else 0):
            scored = self.rollouts.scored(-1 - i)
            self.reward_queries += scored.queries
            metrics = mean_over_ranks(self.learner.update_value(scored.batch, epoch=-1 - i))
            logger.info("value pretraining %d: %s", i, metrics)

    def epoch(self, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        scored = self.rollouts.scored(epoch)
        batch = scored.batch
        maybe_fail(self.faults, "learner", epoch, self.rank)  # mid-epoch: rollouts done, update not
        queries_before = self.learner.reward_queries
        t1 = time.perf_counter()
        learned: dict[str, float] = {}
        if self.cfg.uses_value and self.cfg.value.updates_per_epoch > 0:
            learned.update(self.learner.update_value(batch, epoch=epoch))
        t2 = time.perf_counter()
        learned.update(self.learner.update_policy(batch, epoch=epoch))
        t3 = time.perf_counter()
        sync_s = self.rollouts.publish(self.policy)
        evaluated = self.evaluate_steps(epoch)
        t4 = time.perf_counter()
        (learner_queries,) = sum_over_ranks([float(self.learner.reward_queries - queries_before)])
        self.reward_queries += scored.queries + int(learner_queries)
        busy = sum(
            scored.timings.get(k, 0.0) for k in ("perf/rollout_s", "perf/reward_wait_s", "perf/fetch_s")
        )
        metrics: dict[str, Any] = {
            "epoch": epoch,
            **rollout_metrics(batch, self.cfg.algorithm.kl_coef),
            **scored.monitors,
            **mean_over_ranks(learned),
            **evaluated,
            "samples": (epoch + 1) * self.cfg.run.num_samples,
            "reward_queries": self.reward_queries,
            **scored.timings,
            "perf/value_s": t2 - t1,
            "perf/policy_s": t3 - t2,
            "perf/weight_sync_s": sync_s,
            "perf/epoch_s": t4 - t0,
            "perf/idle_s": max(
                0.0, (t4 - t0) - busy - (t3 - t1) - sync_s - evaluated.get("perf/eval_s", 0.0)
            ),
        }
        self.history = [h for h in self.history if h["epoch"] < epoch] + [summary_record(metrics)]
        grid = grid_images(batch.traj.images) if epoch % self.cfg.run.grid_every == 0 else None
        self.report(EpochDone(metrics, grid))
        return metrics

    @torch.no_grad()
    def evaluate_steps(self, epoch: int) -> dict[str, float]:
        """The updated policy on the fixed evaluation set at every run.eval_num_steps (every run.eval_every
        epochs and at the last): eval/steps_<N>/reward_mean, eval/steps_<N>/kl_continuous and perf/eval_s."""
        run = self.cfg.run
        if not run.eval_num_steps or ((epoch + 1) % run.eval_every and epoch != run.epochs - 1):
            return {}
        t0 = time.perf_counter()
        n = run.eval_num_samples or self.cfg.sampler.batch_size
        out: dict[str, float] = {}
        for steps in run.eval_num_steps:
            scored = self.rollouts.scored(FIXED_EVAL_EPOCH, n, num_steps=steps, priors=False)
            self.reward_queries += scored.queries
            m = rollout_metrics(scored.batch, self.cfg.algorithm.kl_coef)
            out[f"eval/steps_{steps}/reward_mean"] = m["rollout/reward_mean"]
            out[f"eval/steps_{steps}/kl_continuous"] = m["rollout/kl_continuous"]
        return {**out, "perf/eval_s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Reward, KL and monitors of the current policy on a fresh batch (summary.json's 'final')."""
        scored = self.rollouts.scored(self.cfg.run.epochs + EVAL_EPOCH_OFFSET, priors=False)
        self.reward_queries += scored.queries
        m = rollout_metrics(scored.batch, self.cfg.algorithm.kl_coef)
        final = {
            "reward_mean": m["rollout/reward_mean"],
            "kl_mean": m["rollout/kl_mean"],
            "kl_continuous": m["rollout/kl_continuous"],
            "objective": m["rollout/objective"],
            "num_samples": scored.batch.traj.batch_size,
            **scored.monitors,
        }
        self.report(FinalDone(final, grid_images(scored.batch.traj.images), self.reward_queries))
        return final

    # ----------------------------------------------------------------------------------------------
    # Checkpoints
    # ----------------------------------------------------------------------------------------------

    def restore(self) -> None:
        """Load the newest complete checkpoint (``latest``, or the backend's), if any."""
        best, best_epoch = None, -1
        for path in [latest_step_dir(self.checkpoint_dir), *self.hooks.resume_candidates()]:
            if path is None or not (path / "progress.json").is_file():
                continue
            _, progress = read_training_checkpoint(path)
            if progress["epoch"] > best_epoch:
                best, best_epoch = path, progress["epoch"]
        if best is None:
            return
        load_checkpoint(self.policy, best)
        state, progress = read_training_checkpoint(best)
        ranks = state.pop("ranks")
        state.update(ranks[self.rank % len(ranks)])
        load_reward_stats(self.reward_fn, state.pop("reward_stats", None))
        self.learner.load_state_dict(state)
        self.start_epoch = int(progress["epoch"])
        self.history = list(progress.get("history", []))
        self.reward_queries = int(progress.get("reward_queries", 0))
        logger.info("rank %d resumed from %s at epoch %d", self.rank, best, self.start_epoch)

    def save(self, step: int, metrics: dict[str, Any]) -> Path | None:
        """Write step_<step>/ (rank 0) with every rank's learner state, then move ``latest`` to it. Refused,
        with nothing written, if any tensor is non-finite (on every rank: none is left waiting) or another
        job owns the run folder now."""
        t0 = time.perf_counter()
        state = self.learner.state_dict()
        check_finite(self.policy, {**state, "reward_stats": reward_stats_state(self.reward_fn)})
        mine = {"tracker": state.pop("tracker"), "generator": state.pop("generator").tolist()}
        ranks = gather_objects(mine)
        kept = {k: v for k, v in metrics.items() if not k.startswith("perf/")}
        if self.rank != 0:
            self.hooks.checkpoint_written(step, None, kept)
            return None
        state["ranks"] = [
            {"tracker": r["tracker"], "generator": torch.tensor(r["generator"], dtype=torch.uint8)}
            for r in ranks
        ]
        state["reward_stats"] = reward_stats_state(self.reward_fn)
        progress = {
            "epoch": step,
            "samples": step * self.cfg.run.num_samples,
            "reward_queries": self.reward_queries,
            "history": self.history,
            "world_size": self.world,
            "backend": self.hooks.backend,
        }
        path = write_training_checkpoint(
            self.checkpoint_dir,
            step,
            self.policy,
            state,
            progress,
            self.cfg.model_dump(),
            kept,
            before_publish=lambda: maybe_fail(self.faults, "save", step, 0),
        )
        verify_owner(self.checkpoint_dir.parent, self.run_id)
        self.hooks.checkpoint_written(step, path, kept)
        publish_latest(self.checkpoint_dir, path, self.cfg.run.keep_checkpoints)
        self.report(CheckpointDone(step, str(path), time.perf_counter() - t0))
        return path
