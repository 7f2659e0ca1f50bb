"""Rollouts: an epoch's prompts, sampled as rollout batches with the current policy and scored.

The epoch loop asks a ``Rollouts`` for each epoch's ``Scored`` batch and tells it when the policy has new
weights. Two implementations: ``LocalRollouts`` (this module: samples and scores in this process, with the
learner's own policy) and ``scoreaction.distributed.rollouts.RayRollouts`` (rollout and reward actors on a
Ray cluster, scoring each batch while the next is sampled). Both sample rollout batch ``index`` of ``epoch``
with noise from ``batch_seed(run.seed, epoch, index)`` alone and score it with a ``Scorer``, so they return
the same batch: a batch re-run after a crash, sampled by another worker, or by another number of workers,
is the same batch.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch

from scoreaction.builders import epoch_prompts
from scoreaction.config import Config
from scoreaction.faults import FaultPlan, fires
from scoreaction.rewards import RewardFn
from scoreaction.sampling import Policy, Trajectory, sample_trajectories
from scoreaction.scoring import Scored, Scorer, assemble


def batch_bounds(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each rollout batch of an epoch."""
    return [(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed of rollout batch `index` of `epoch`; epochs may be negative (value pre-training) or
    offset (evaluation)."""
    entropy = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch + (1 << 20), index]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sample_batch(
    policy: Policy, cfg: Config, epoch: int, index: int, prompts: list[str], num_steps: int | None = None
) -> Trajectory:
    """Rollout batch `index` of `epoch`, with the reference KL recorded, on CPU; num_steps: sample with
    that many steps instead of sampler.num_steps (evaluation). The starting noise is the same either way."""
    sampler = cfg.sampler if num_steps is None else cfg.sampler.model_copy(update={"num_steps": num_steps})
    gen = torch.Generator(device=policy.device).manual_seed(batch_seed(cfg.run.seed, epoch, index))
    return sample_trajectories(policy, prompts, sampler, gen, record_reference=True).to("cpu")


class Rollouts(Protocol):
    """Where an epoch's scored rollouts come from."""

    def publish(self, policy: Policy) -> float:
        """The policy has new weights: sample with them from now on. Returns the seconds it took."""

    def scored(
        self, epoch: int, num_samples: int | None = None, num_steps: int | None = None, priors: bool = True
    ) -> Scored:
        """The epoch's prompts (run.num_samples, or the first num_samples of them) sampled (with num_steps
        steps: evaluation) and scored; priors=False: without the rewards of x0_hat (evaluation)."""

    def close(self) -> None:
        """Release what the rollouts hold."""


class LocalRollouts:
    """Samples with the learner's policy and scores with the learner's reward, in this process, one rollout
    batch after the other (scoring does not overlap sampling here)."""

    def __init__(
        self,
        cfg: Config,
        policy: Policy,
        reward_fn: RewardFn,
        monitors: dict[str, RewardFn],
        faults: FaultPlan | None = None,
    ) -> None:
        self.cfg, self.policy, self.reward_fn, self.faults = cfg, policy, reward_fn, faults
        self.scorer = Scorer(cfg, reward_fn, monitors, policy)

    def publish(self, policy: Policy) -> float:
        return 0.0  # the same policy object: nothing to copy

    def scored(
        self, epoch: int, num_samples: int | None = None, num_steps: int | None = None, priors: bool = True
    ) -> Scored:
        prompts = epoch_prompts(self.cfg, epoch, num_samples)
        sample_s = score_s = 0.0
        trajectories, scores = [], []
        for index, (a, b) in enumerate(batch_bounds(len(prompts), self.cfg.sampler.batch_size)):
            t0 = time.perf_counter()
            traj = sample_batch(self.policy, self.cfg, epoch, index, prompts[a:b], num_steps)
            t1 = time.perf_counter()
            scores.append(self.scorer.score(traj, fires(self.faults, "nan_reward", epoch, 0), priors))
            sample_s, score_s = sample_s + t1 - t0, score_s + time.perf_counter() - t1
            trajectories.append(traj)
        t2 = time.perf_counter()
        out = assemble(trajectories, scores, self.reward_fn)
        out.timings = {
            "perf/rollout_s": sample_s,
            "perf/reward_wait_s": score_s,
            "perf/fetch_s": time.perf_counter() - t2,
        }
        return out

    def close(self) -> None:
        pass
