"""``RayRollouts``: the epoch loop's rollouts on Ray actors (the in-process ones are
``scoreaction.rollouts.LocalRollouts``).

Learner rank 0 drives the actors. ``publish`` puts the new weights in the object store once and has every
rollout worker load them. ``scored`` splits the epoch's prompts into rollout batches round robin over the
rollout workers and hands each batch's ObjectRef to a reward worker at once, so scoring batch i overlaps
sampling batch i + 1; then rank 0 broadcasts the epoch's ObjectRefs and every rank fetches the batches and
assembles the same scored batch (``scoring.assemble``). Trajectories stay in the object store until then.
"""

from __future__ import annotations

import time
import uuid

import ray
import ray.train.collective

from scoreaction.builders import epoch_prompts
from scoreaction.config import Config
from scoreaction.distributed.actors import to_numpy
from scoreaction.rewards import RewardFn
from scoreaction.rollouts import batch_bounds
from scoreaction.sampling import Policy
from scoreaction.scoring import Scored, assemble


class RayRollouts:
    """rollout_workers / reward_workers: the actor handles (rank 0 only; the other ranks pass none)."""

    def __init__(
        self,
        cfg: Config,
        reward_fn: RewardFn,
        rank: int,
        world: int,
        rollout_workers: list | None = None,
        reward_workers: list | None = None,
    ) -> None:
        self.cfg, self.reward_fn, self.rank, self.world = cfg, reward_fn, rank, world
        self.rollout_workers = rollout_workers or []
        self.reward_workers = reward_workers or []
        if rank == 0 and not (self.rollout_workers and self.reward_workers):
            raise ValueError("learner rank 0 drives the rollouts: it needs rollout and reward workers")
        self.version: str | None = None
        self._state_ref: ray.ObjectRef | None = None

    def publish(self, policy: Policy) -> float:
        """Rank 0: put the new weights in the object store once and wait until every rollout worker has them.
        Sampling calls carry the same ref, so a restarted worker reloads them."""
        if self.rank != 0:
            return 0.0
        t0 = time.perf_counter()
        self._state_ref = ray.put(to_numpy(policy.trainable_state_dict()))
        self.version = uuid.uuid4().hex[:12]
        ray.get([w.load_weights.remote(self.version, [self._state_ref]) for w in self.rollout_workers])
        return time.perf_counter() - t0

    def _submit(
        self, epoch: int, num_samples: int | None, num_steps: int | None, priors: bool
    ) -> tuple[list, list]:
        if self._state_ref is None:
            raise RuntimeError("publish() the policy weights before the first rollout")
        prompts = epoch_prompts(self.cfg, epoch, num_samples)
        trajectories, scores = [], []
        for i, (a, b) in enumerate(batch_bounds(len(prompts), self.cfg.sampler.batch_size)):
            worker = self.rollout_workers[i % len(self.rollout_workers)]
            tref = worker.sample.remote(self.version, [self._state_ref], epoch, i, prompts[a:b], num_steps)
            trajectories.append(tref)
            scorer = self.reward_workers[i % len(self.reward_workers)]
            scores.append(scorer.score.remote(epoch, i, tref, priors))
        return trajectories, scores

    def scored(
        self, epoch: int, num_samples: int | None = None, num_steps: int | None = None, priors: bool = True
    ) -> Scored:
        """Every rank gets the epoch's whole scored batch. perf/rollout_s: until the last batch is sampled;
        perf/reward_wait_s: the scoring left after that (the part not overlapped); perf/fetch_s: fetching
        and assembling on this rank."""
        payload = None
        if self.rank == 0:
            t0 = time.perf_counter()
            trajectories, scores = self._submit(epoch, num_samples, num_steps, priors)
            ray.wait(trajectories, num_returns=len(trajectories), fetch_local=False)
            t1 = time.perf_counter()
            ray.wait(scores, num_returns=len(scores), fetch_local=False)
            timings = {"perf/rollout_s": t1 - t0, "perf/reward_wait_s": time.perf_counter() - t1}
            payload = (trajectories, scores, timings)
        if self.world > 1:
            payload = ray.train.collective.broadcast_from_rank_zero(payload)
        trajectories, scores, timings = payload
        t2 = time.perf_counter()
        out = assemble(ray.get(trajectories), ray.get(scores), self.reward_fn)
        out.timings = {**timings, "perf/fetch_s": time.perf_counter() - t2}
        return out

    def close(self) -> None:
        self._state_ref = None
