"""The actors of a distributed run: RolloutWorker (policy copy, SDE sampling), RewardWorker (scores terminal
images), MetricsSink (the learner's mailbox to the driver).

They are plain classes, made into Ray actors by ``ray.remote(...)`` in the driver, so they also run (and
are tested) in one process. Determinism: the noise of rollout batch ``chunk`` of epoch ``epoch`` comes from
a generator seeded by (run.seed, epoch, chunk) alone, so a batch re-run after a crash, or sampled by another
worker, or with a different number of workers, is the same batch.
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

from scoreaction.config import Config
from scoreaction.distributed.faults import FaultPlan, fires, maybe_fail
from scoreaction.learner import reward_of_x0_hat, x0_hat
from scoreaction.rewards import RewardFn, WeightedSum, build_reward
from scoreaction.sampling import Trajectory, sample_trajectories
from scoreaction.trainer import build_policy

logger = logging.getLogger(__name__)

# Epoch indices of rollouts that are not fine-tuning epochs (as in scoreaction.trainer.Trainer).
EVAL_EPOCH_OFFSET = 10_000


def chunk_bounds(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) of each rollout batch of an epoch."""
    return [(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]


def chunk_seed(seed: int, epoch: int, chunk: int) -> int:
    """A 63-bit seed from (run seed, epoch, batch index); epochs may be negative (value pre-training)."""
    entropy = [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch + (1 << 20), chunk]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


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


class RolloutWorker:
    """Holds the pipeline and a policy copy; samples trajectories with the reference KL recorded."""

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
        import ray

        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(self.policy.device),
            "threads": torch.get_num_threads(),
        }

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

    def sample(self, version: str, state_box: list, epoch: int, chunk: int, prompts: list[str]) -> Trajectory:
        """One rollout batch of the given epoch with the weights of `version` (loaded first if this worker
        restarted or has not seen them yet). Returns a CPU Trajectory."""
        self.load_weights(version, state_box)
        maybe_fail(self.faults, "rollout", epoch, self.index)
        gen = torch.Generator(device=self.policy.device).manual_seed(
            chunk_seed(self.cfg.run.seed, epoch, chunk)
        )
        return sample_trajectories(self.policy, prompts, self.cfg.sampler, gen, record_reference=True).to(
            "cpu"
        )


def running_normalized(reward_fn) -> bool:
    """Whether the reward is a weighted sum with running normalisation (reward.normalize: running)."""
    return isinstance(reward_fn, WeightedSum) and reward_fn.normalize == "running"


def raw_parts_of_x0_hat(
    policy, traj: Trajectory, reward: WeightedSum, chunk: int = 64
) -> dict[str, torch.Tensor]:
    """Every part's raw score of decode(x0_hat_k), {name: (B, N)}: reward_of_x0_hat, part by part."""
    x0 = x0_hat(policy, traj)
    b, n = x0.shape[:2]
    flat = x0.reshape(b * n, *x0.shape[2:])
    prompts = [p for p in traj.prompts for _ in range(n)]
    out: dict[str, list[torch.Tensor]] = {name: [] for name in reward.parts}
    for i in range(0, b * n, chunk):
        decoded = policy.decode(flat[i : i + chunk])
        if decoded.dim() == 4:
            decoded = decoded.clamp(0, 1)
        for name, part in reward.parts.items():
            out[name].append(part.score(decoded, prompts[i : i + chunk]).scores.float().cpu())
    return {name: torch.cat(v).view(b, n) for name, v in out.items()}


def _weighted(reward: WeightedSum, raw: dict[str, torch.Tensor]) -> torch.Tensor:
    """WeightedSum's running normalisation of one call, from the parts' raw scores (updates the stats)."""
    total = None
    for name in reward.parts:
        part_raw = raw[name].float()
        reward.stats[name].update(part_raw)
        s = reward.stats[name]
        term = reward.weights[name] * ((part_raw - s.mean) / s.std)
        total = term if total is None else total + term
    return torch.zeros(0) if total is None else total


def normalize_running(
    reward: WeightedSum,
    terminal: dict[str, torch.Tensor],
    x0: dict[str, torch.Tensor] | None = None,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rewards (B,) and r_x0 (B, N) of a whole epoch from the parts' raw scores, with the running statistics
    that the learner holds (and checkpoints): the very numbers the single-process Trainer's WeightedSum
    computes when it scores the epoch's images, then x0_hat in chunks of `chunk`. Reward workers keep no
    state, so a restarted one scores exactly as before."""
    rewards = torch.zeros(next(iter(terminal.values())).shape[0]) + _weighted(reward, terminal)
    if x0 is None:
        return rewards, None
    b, n = next(iter(x0.values())).shape
    flat = {k: v.reshape(-1) for k, v in x0.items()}
    parts = [
        _weighted(reward, {k: v[i : i + chunk] for k, v in flat.items()}) for i in range(0, b * n, chunk)
    ]
    return rewards, torch.cat(parts).view(b, n)


class RewardWorker:
    """Scores rollout batches: the reward of the terminal images, and R(x0_hat_k) for every state when the
    value function uses the reward prior (ctrl with value.use_reward_prior: Config.scores_x0_hat).

    With reward.normalize: running, it returns every part's raw scores instead ({name: tensor}); the learner
    normalises them with the running statistics it checkpoints (``normalize_running``)."""

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
        self.reward_fn = reward_factory(self.cfg) if reward_factory else build_reward(self.cfg.reward)
        # decode() and the schedule for x0_hat; built only when needed
        self._policy = build_policy(self.cfg) if self.cfg.scores_x0_hat else None

    def ready(self) -> dict[str, Any]:
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def score(self, epoch: int, chunk: int, traj: Trajectory) -> tuple[Any, Any]:
        """rewards (B,) float32 and r_x0 (B, N) or None, on CPU; with running normalisation, the parts' raw
        scores {name: (B,)} and {name: (B, N)} or None."""
        maybe_fail(self.faults, "reward", epoch, self.index)
        nan = fires(self.faults, "nan_reward", epoch, self.index)
        if running_normalized(self.reward_fn):
            parts = {
                name: part.score(traj.images, traj.prompts).scores.float().cpu()
                for name, part in self.reward_fn.parts.items()
            }
            if nan:
                parts = {k: torch.full_like(v, float("nan")) for k, v in parts.items()}
            x0 = raw_parts_of_x0_hat(self._policy, traj, self.reward_fn) if self._policy is not None else None
            return parts, x0
        rewards = self.reward_fn(traj.images, traj.prompts).float().cpu()
        if nan:
            rewards = torch.full_like(rewards, float("nan"))
        r_x0 = reward_of_x0_hat(self._policy, traj, self.reward_fn) if self._policy is not None else None
        return rewards, r_x0


class MetricsSink:
    """The learner's mailbox to the driver: (kind, payload) events, drained by the driver's reporter."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.seen: list[tuple[str, int]] = []

    def push(self, kind: str, payload: Any) -> None:
        self.events.append((kind, payload))
        if isinstance(payload, dict) and "epoch" in payload:
            self.seen.append((kind, int(payload["epoch"])))

    def drain(self) -> list[tuple[str, Any]]:
        out, self.events = self.events, []
        return out

    def progress(self) -> list[tuple[str, int]]:
        """(kind, epoch) of every event so far (tests watch it to act mid-run)."""
        return list(self.seen)
