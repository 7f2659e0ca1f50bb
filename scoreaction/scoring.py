"""Scoring rollouts: the optimised reward of the terminal images, R(x0_hat_k) at every state when the value
function uses the reward prior, and the held-out monitor rewards; then one epoch's scored ``Batch``.

A ``Scorer`` scores one rollout batch and keeps no state, so a restarted scorer (a Ray reward actor) scores
exactly as before. ``assemble`` turns an epoch's rollout batches and their scores into the learner's batch:
with ``reward.normalize: running`` the scorer returns every reward part's raw scores and ``assemble``
normalises them over the whole epoch with the running statistics of the learner's reward (which the
training checkpoints hold), so every learner rank computes the same numbers on either backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from scoreaction.config import Config
from scoreaction.rewards import RewardFn, WeightedSum
from scoreaction.sampling import Policy, Trajectory
from scoreaction.sde import alpha_bar, x0_hat

DECODE_CHUNK = 64
"""States decoded and scored at once when scoring x0_hat (B * N of them per rollout batch)."""


@dataclass
class Batch:
    """One epoch's scored trajectories. rewards: (B,); r_x0: (B, N) reward of x0_hat_k, or None."""

    traj: Trajectory
    rewards: Tensor
    r_x0: Tensor | None = None

    def index(self, idx: Tensor | slice) -> Batch:
        return Batch(
            self.traj.index(idx), self.rewards[idx], self.r_x0[idx] if self.r_x0 is not None else None
        )


def trajectory_x0_hat(policy: Policy, traj: Trajectory) -> Tensor:
    """x0_hat_k (B, N, ...) at every state k < N of the trajectories, from the rollout's epsilons
    (``extras['eps']``): ``sde.x0_hat`` with alpha_bar(t_k) per state."""
    eps = traj.extras["eps"]
    ab = alpha_bar(policy.schedule, traj.timesteps[:-1]).float().to(eps.device)
    return x0_hat(traj.latents[:, :-1], eps, ab.view((1, -1) + (1,) * (eps.dim() - 2)))


def _decoded_x0_hat(policy: Policy, traj: Trajectory):
    """(start, decoded images, their prompts) of decode(x0_hat_k) for all B * N states, DECODE_CHUNK at a
    time; then (B, N)."""
    x0 = trajectory_x0_hat(policy, traj)
    b, n = x0.shape[:2]
    flat = x0.reshape(b * n, *x0.shape[2:])
    prompts = [p for p in traj.prompts for _ in range(n)]
    for i in range(0, b * n, DECODE_CHUNK):
        decoded = policy.decode(flat[i : i + DECODE_CHUNK])
        yield (decoded.clamp(0, 1) if decoded.dim() == 4 else decoded), prompts[i : i + DECODE_CHUNK]


@torch.no_grad()
def reward_of_x0_hat(policy: Policy, traj: Trajectory, reward_fn: RewardFn) -> Tensor:
    """R(decode(x0_hat_k)) for every state k < N: (B, N). Frozen (no grad)."""
    out = [reward_fn(images, prompts).float().cpu() for images, prompts in _decoded_x0_hat(policy, traj)]
    return torch.cat(out).view(traj.batch_size, traj.num_steps)


@torch.no_grad()
def raw_parts_of_x0_hat(policy: Policy, traj: Trajectory, reward: WeightedSum) -> dict[str, Tensor]:
    """Every part's raw score of decode(x0_hat_k), {name: (B, N)}: reward_of_x0_hat, part by part."""
    out: dict[str, list[Tensor]] = {name: [] for name in reward.parts}
    for images, prompts in _decoded_x0_hat(policy, traj):
        for name, part in reward.parts.items():
            out[name].append(part.score(images, prompts).scores.float().cpu())
    return {name: torch.cat(v).view(traj.batch_size, traj.num_steps) for name, v in out.items()}


def running_normalized(reward_fn) -> bool:
    """Whether the reward is a weighted sum with running normalisation (reward.normalize: running)."""
    return isinstance(reward_fn, WeightedSum) and reward_fn.normalize == "running"


@dataclass
class Scores:
    """The scores of one rollout batch, on CPU. rewards: (B,) float32, or with running normalisation every
    part's raw scores {name: (B,)}; r_x0: (B, N) (or {name: (B, N)}) when x0_hat is scored, else None;
    monitors: {name: (B,)} of the held-out rewards (reward.monitor)."""

    rewards: Tensor | dict[str, Tensor]
    r_x0: Tensor | dict[str, Tensor] | None = None
    monitors: dict[str, Tensor] = field(default_factory=dict)

    @property
    def queries(self) -> int:
        """Images and states the optimised reward scored."""
        r = self.rewards if isinstance(self.rewards, Tensor) else next(iter(self.rewards.values()))
        x = self.r_x0 if not isinstance(self.r_x0, dict) else next(iter(self.r_x0.values()))
        return int(r.shape[0]) + (int(x.numel()) if x is not None else 0)


class Scorer:
    """Scores rollout batches with the optimised reward (and its x0_hat priors when the config needs them:
    Config.scores_x0_hat) and the monitors. policy: for decode() and the schedule of x0_hat; only needed
    when x0_hat is scored."""

    def __init__(
        self, cfg: Config, reward_fn: RewardFn, monitors: dict[str, RewardFn], policy: Policy | None
    ) -> None:
        if cfg.scores_x0_hat and policy is None:
            raise ValueError(
                "this config scores x0_hat (value.use_reward_prior): the Scorer needs the policy"
            )
        self.cfg, self.reward_fn, self.monitors, self.policy = cfg, reward_fn, monitors, policy

    def score(self, traj: Trajectory, nan: bool = False, priors: bool = True) -> Scores:
        """nan: return NaN rewards (fault drills: a reward that breaks); priors=False: leave out the
        rewards of x0_hat even when the config needs them for training (evaluation)."""
        x0 = self.policy if self.cfg.scores_x0_hat and priors else None
        if running_normalized(self.reward_fn):
            parts = {
                name: part.score(traj.images, traj.prompts).scores.float().cpu()
                for name, part in self.reward_fn.parts.items()
            }
            rewards: Tensor | dict[str, Tensor] = parts
            if nan:
                rewards = {k: torch.full_like(v, float("nan")) for k, v in parts.items()}
            r_x0 = raw_parts_of_x0_hat(x0, traj, self.reward_fn) if x0 is not None else None
        else:
            rewards = self.reward_fn(traj.images, traj.prompts).float().cpu()
            if nan:
                rewards = torch.full_like(rewards, float("nan"))
            r_x0 = reward_of_x0_hat(x0, traj, self.reward_fn) if x0 is not None else None
        monitors = {
            name: fn(traj.images, traj.prompts).float().cpu().reshape(-1)
            for name, fn in self.monitors.items()
        }
        return Scores(rewards, r_x0, monitors)


def _weighted(reward: WeightedSum, raw: dict[str, Tensor]) -> Tensor:
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
    reward: WeightedSum, terminal: dict[str, Tensor], x0: dict[str, Tensor] | None = None
) -> tuple[Tensor, Tensor | None]:
    """Rewards (B,) and r_x0 (B, N) of a whole epoch from the parts' raw scores, with the running statistics
    of the learner's reward: the numbers WeightedSum computes when it scores the epoch's images at once, then
    x0_hat DECODE_CHUNK states at a time."""
    rewards = torch.zeros(next(iter(terminal.values())).shape[0]) + _weighted(reward, terminal)
    if x0 is None:
        return rewards, None
    b, n = next(iter(x0.values())).shape
    flat = {k: v.reshape(-1) for k, v in x0.items()}
    parts = [
        _weighted(reward, {k: v[i : i + DECODE_CHUNK] for k, v in flat.items()})
        for i in range(0, b * n, DECODE_CHUNK)
    ]
    return rewards, torch.cat(parts).view(b, n)


@dataclass
class Scored:
    """One epoch's scored rollouts as every learner rank receives them. monitors: monitor/<name>_mean;
    queries: images and states the optimised reward scored; timings: perf/* seconds of this epoch's
    sampling and scoring."""

    batch: Batch
    monitors: dict[str, float]
    queries: int
    timings: dict[str, float] = field(default_factory=dict)


def assemble(trajectories: list[Trajectory], scores: list[Scores], reward_fn: RewardFn) -> Scored:
    """The epoch's scored batch from its rollout batches and their scores, in batch order."""
    traj = Trajectory.cat(trajectories)
    if isinstance(scores[0].rewards, dict):
        terminal = {k: torch.cat([s.rewards[k] for s in scores]) for k in scores[0].rewards}
        x0 = {k: torch.cat([s.r_x0[k] for s in scores]) for k in scores[0].r_x0} if scores[0].r_x0 else None
        rewards, r_x0 = normalize_running(reward_fn, terminal, x0)
    else:
        rewards = torch.cat([s.rewards for s in scores])
        r_x0 = torch.cat([s.r_x0 for s in scores]) if scores[0].r_x0 is not None else None
    monitors = {
        f"monitor/{name}_mean": float(torch.cat([s.monitors[name] for s in scores]).mean())
        for name in scores[0].monitors
    }
    return Scored(Batch(traj, rewards, r_x0), monitors, sum(s.queries for s in scores))
