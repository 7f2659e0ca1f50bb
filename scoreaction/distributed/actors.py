"""The actors of a Ray run: RolloutWorker (a policy copy that samples rollout batches), RewardWorker (scores
them with a ``Scorer``), EventSink (rank 0's mailbox to the driver's reporter).

They are plain classes, made into Ray actors by ``ray.remote(...)`` in the driver, and wrap the same
functions the in-process backend calls (``rollouts.sample_batch``, ``scoring.Scorer``), so both backends
sample and score a batch identically.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from scoreaction.builders import build_policy
from scoreaction.config import Config
from scoreaction.faults import FaultPlan, fires, maybe_fail
from scoreaction.reporter import Event
from scoreaction.rewards import RewardFn, build_monitors, build_reward
from scoreaction.rollouts import sample_batch
from scoreaction.sampling import Trajectory
from scoreaction.scoring import Scorer, Scores

logger = logging.getLogger(__name__)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


def to_numpy(state: dict[str, torch.Tensor]) -> dict:
    """CPU tensors as numpy arrays where numpy has the dtype: Ray reads those zero-copy from shared memory,
    so a worker on the same node copies the weights once (into its model), not twice."""
    return {
        k: v.numpy() if v.dtype in (torch.float32, torch.float16, torch.float64) else v
        for k, v in state.items()
    }


def from_numpy(state: dict) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # read-only shared memory: load_state_dict copies out of it
        warnings.simplefilter("ignore", UserWarning)
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


def _where() -> dict[str, Any]:
    import ray

    return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}


class RolloutWorker:
    """Holds the pipeline and a policy copy; samples rollout batches with the reference KL recorded."""

    def __init__(
        self, cfg: dict, index: int, threads: int | None = None, faults: FaultPlan | None = None
    ) -> None:
        set_threads(threads)
        self.cfg = Config.model_validate(cfg)
        self.index = index
        self.faults = faults
        torch.manual_seed(self.cfg.run.seed)
        self.policy = build_policy(self.cfg)
        self.version: str | None = None

    def ready(self) -> dict[str, Any]:
        return {**_where(), "device": str(self.policy.device), "threads": torch.get_num_threads()}

    def load_weights(self, version: str, state_box: list) -> float:
        """Load the trainable weights of `version` unless already loaded; seconds spent.

        state_box: [ObjectRef of the state dict] (boxed so that Ray does not fetch it for every call)
        or [state dict] when called in-process.
        """
        if version == self.version:
            return 0.0
        t0 = time.perf_counter()
        state = state_box[0]
        if not isinstance(state, dict):
            import ray

            state = ray.get(state)
        self.policy.load_trainable_state_dict(from_numpy(state))
        self.version = version
        return time.perf_counter() - t0

    def sample(
        self,
        version: str,
        state_box: list,
        epoch: int,
        index: int,
        prompts: list[str],
        num_steps: int | None = None,
    ) -> Trajectory:
        """Rollout batch `index` of `epoch` with the weights of `version` (loaded first if this worker
        restarted or has not seen them yet)."""
        self.load_weights(version, state_box)
        maybe_fail(self.faults, "rollout", epoch, self.index)
        return sample_batch(self.policy, self.cfg, epoch, index, prompts, num_steps)


class RewardWorker:
    """Scores rollout batches (``scoring.Scorer``): the optimised reward, x0_hat priors when needed, monitors.
    Keeps no state, so a restarted one scores exactly as before."""

    def __init__(
        self,
        cfg: dict,
        index: int,
        threads: int | None = None,
        faults: FaultPlan | None = None,
        reward_factory: Callable[[Config], RewardFn] | None = None,
    ) -> None:
        set_threads(threads)
        self.cfg = Config.model_validate(cfg)
        self.index = index
        self.faults = faults
        reward_fn = reward_factory(self.cfg) if reward_factory else build_reward(self.cfg.reward)
        # decode() and the schedule of x0_hat: built only when needed
        policy = build_policy(self.cfg) if self.cfg.scores_x0_hat else None
        self.scorer = Scorer(self.cfg, reward_fn, build_monitors(self.cfg.reward), policy)

    def ready(self) -> dict[str, Any]:
        return _where()

    def score(self, epoch: int, index: int, traj: Trajectory, priors: bool = True) -> Scores:
        maybe_fail(self.faults, "reward", epoch, self.index)
        return self.scorer.score(traj, fires(self.faults, "nan_reward", epoch, self.index), priors)


class EventSink:
    """Rank 0's mailbox to the driver: the loop's events (``scoreaction.reporter``), drained by the driver."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def push(self, event: Event) -> None:
        self.events.append(event)

    def drain(self) -> list[Event]:
        out, self.events = self.events, []
        return out
