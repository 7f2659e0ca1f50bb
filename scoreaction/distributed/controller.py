"""The epoch controller: runs on learner rank 0 and drives the rollout and reward actors.

Per epoch: publish the policy weights once (``ray.put`` of the CPU state dict; every rollout worker loads
the same ref), split the epoch's prompts into rollout batches round robin over the rollout workers, and
hand each batch's ObjectRef to a reward worker at once, so scoring batch i overlaps sampling batch i + 1.
Trajectories stay in the object store: only ObjectRefs pass through here; every learner rank fetches them.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import ray
import torch

from scoreaction.config import Config
from scoreaction.distributed.workers import chunk_bounds, normalize_running, to_numpy
from scoreaction.learner import Batch
from scoreaction.sampling import Trajectory
from scoreaction.trainer import epoch_prompts


@dataclass
class EpochRefs:
    """ObjectRefs of one epoch's rollout batches and their scores, in batch order."""

    epoch: int
    trajectories: list[ray.ObjectRef]
    scores: list[ray.ObjectRef]
    timings: dict[str, float] = field(default_factory=dict)


class EpochRunner:
    def __init__(self, cfg: Config, rollout_workers: list, reward_workers: list) -> None:
        self.cfg = cfg
        self.rollout_workers = rollout_workers
        self.reward_workers = reward_workers
        self.version: str | None = None
        self._state_ref: ray.ObjectRef | None = None

    def publish(self, state: dict[str, torch.Tensor]) -> float:
        """Put the new weights in the object store once and have every rollout worker load them; seconds
        until all have them. Sampling calls carry the same ref, so a restarted worker reloads them."""
        t0 = time.perf_counter()
        self._state_ref = ray.put(to_numpy(state))
        self.version = uuid.uuid4().hex[:12]
        ray.get([w.load_weights.remote(self.version, [self._state_ref]) for w in self.rollout_workers])
        return time.perf_counter() - t0

    def submit(self, epoch: int, num_samples: int | None = None) -> EpochRefs:
        """Start the epoch's rollouts and the scoring of each batch as it lands; returns at once."""
        if self._state_ref is None:
            raise RuntimeError("publish() the policy weights before the first rollout")
        prompts = epoch_prompts(self.cfg, epoch, num_samples)
        trajs, scores = [], []
        for i, (a, b) in enumerate(chunk_bounds(len(prompts), self.cfg.sampler.batch_size)):
            worker = self.rollout_workers[i % len(self.rollout_workers)]
            tref = worker.sample.remote(self.version, [self._state_ref], epoch, i, prompts[a:b])
            sref = self.reward_workers[i % len(self.reward_workers)].score.remote(epoch, i, tref)
            trajs.append(tref)
            scores.append(sref)
        return EpochRefs(epoch, trajs, scores, {"submitted_at": time.perf_counter()})

    @staticmethod
    def wait(refs: EpochRefs) -> EpochRefs:
        """Block until every batch is sampled and scored; records perf/rollout_s (until the last batch is
        sampled) and perf/reward_wait_s (scoring left after that: the part not overlapped)."""
        t0 = refs.timings["submitted_at"]
        ray.wait(refs.trajectories, num_returns=len(refs.trajectories), fetch_local=False)
        t1 = time.perf_counter()
        ray.wait(refs.scores, num_returns=len(refs.scores), fetch_local=False)
        t2 = time.perf_counter()
        refs.timings.update({"perf/rollout_s": t1 - t0, "perf/reward_wait_s": t2 - t1})
        return refs


def fetch_batch(trajectories: list, scores: list, reward_fn=None) -> Batch:
    """The scored batch of an epoch from its ObjectRefs (every learner rank calls this). Raw part scores
    (reward.normalize: running) are normalised here with reward_fn's running statistics, over the whole
    epoch, so every rank computes the same numbers and the statistics live with the learner's state."""
    parts: list[Trajectory] = ray.get(trajectories)
    scored = ray.get(scores)
    traj = Trajectory.cat(parts)
    if isinstance(scored[0][0], dict):
        terminal = {k: torch.cat([r[k] for r, _ in scored]) for k in scored[0][0]}
        x0 = (
            {k: torch.cat([x[k] for _, x in scored]) for k in scored[0][1]}
            if scored[0][1] is not None
            else None
        )
        rewards, r_x0 = normalize_running(reward_fn, terminal, x0)
        return Batch(traj, rewards, r_x0)
    rewards = torch.cat([r for r, _ in scored])
    r_x0 = torch.cat([x for _, x in scored]) if scored[0][1] is not None else None
    return Batch(traj, rewards, r_x0)


def shard_rows(batch_size: int, rank: int, world: int) -> slice:
    """The rows of the rank's contiguous 1/world of a batch (world divides the batch size)."""
    n = batch_size // world
    return slice(rank * n, (rank + 1) * n)


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """The rank's contiguous 1/world of the batch (world divides the batch size: plan.validate_layout)."""
    if world == 1:
        return batch
    sl = shard_rows(batch.traj.batch_size, rank, world)
    return Batch(batch.traj.index(sl), batch.rewards[sl], batch.r_x0[sl] if batch.r_x0 is not None else None)
