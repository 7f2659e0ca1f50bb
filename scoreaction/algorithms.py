"""Pure algorithm math for CTRL and DDPO: returns, advantages, losses, the per-prompt stat tracker.

Shapes: B trajectories, N steps. values: (B, N + 1) with values[:, N] = r(x_N); kl: (B, N) = KL_k.
No Ray, no I/O: functions of tensors, tested against hand-computed numbers.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor


def reward_to_go(reward: Tensor, kl: Tensor, kl_coef: float) -> Tensor:
    """Monte-Carlo regression target G_k = r(x_N) - kl_coef * sum_{j >= k} KL_j: (B, N + 1), G_N = r."""
    tail = torch.flip(torch.cumsum(torch.flip(kl, dims=[1]), dim=1), dims=[1])  # sum_{j>=k} KL_j
    tail = torch.cat([tail, torch.zeros_like(tail[:, :1])], dim=1)
    return reward[:, None] - kl_coef * tail


def td_advantages(values: Tensor, kl: Tensor, kl_coef: float) -> Tensor:
    """A_k = V(t_{k+1}, x_{k+1}) - V(t_k, x_k) - kl_coef * KL_k: (B, N). values[:, N] must be the reward.

    They telescope: sum_k A_k = r - V(t_0, x_{t_0}) - kl_coef * sum_k KL_k (x_{t_0}: the starting noise).
    """
    return values[:, 1:] - values[:, :-1] - kl_coef * kl


def lambda_advantages(values: Tensor, kl: Tensor, kl_coef: float, lam: float) -> Tensor:
    """Exponentially weighted TD advantages (GAE without discount): A_k = sum_{j>=k} lam^(j-k) delta_j with
    delta_j the TD advantage of step j. lam = 0: the TD advantages; lam = 1: r - kl_coef sum_{j>=k} KL_j -
    V(t_k, x_k), the Monte-Carlo return less the value (unbiased whatever V, noisier)."""
    delta = td_advantages(values, kl, kl_coef)
    if lam == 0:
        return delta
    out = torch.empty_like(delta)
    acc = torch.zeros_like(delta[:, 0])
    for k in range(delta.shape[1] - 1, -1, -1):
        acc = delta[:, k] + lam * acc
        out[:, k] = acc
    return out


def normalize_per_step(adv: Tensor, clip: float, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Normalise each step index over the batch and clip: returns (advantages (B, N), std (N,))."""
    mean = adv.mean(dim=0, keepdim=True)
    std = adv.std(dim=0, keepdim=True) if adv.shape[0] > 1 else torch.ones_like(mean)
    std = std.clamp_min(eps)
    return ((adv - mean) / std).clamp(-clip, clip), std.squeeze(0)


def clipped_surrogate(
    advantages: Tensor, log_ratio: Tensor, clip_range: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped objective as a loss (cleanrl names).

    pg_loss1 = -A * rho, pg_loss2 = -A * clip(rho, 1 - eps, 1 + eps), loss = mean(max(pg_loss1, pg_loss2)).
    Returns (loss, clipfrac, approx_kl) where approx_kl = mean((rho - 1) - log rho) (Schulman's k3).
    """
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.max(pg_loss1, pg_loss2).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = ((ratio - 1) - log_ratio).mean()
    return loss, clipfrac, approx_kl


class PerPromptStatTracker:
    """DDPO's per-prompt reward normaliser (ddpo-pytorch's stat_tracking.py, same semantics).

    Keeps the last ``buffer_size`` rewards of each prompt; once a prompt has ``min_count`` of them its own
    mean/std normalise its rewards, before that the statistics of the whole batch do.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray | Tensor) -> np.ndarray:
        rewards = np.asarray(rewards, dtype=np.float64)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(np.asarray(prompts, dtype=object)):
            mask = np.asarray([p == prompt for p in prompts])
            r = rewards[mask]
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r.tolist())
            if len(buf) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
            advantages[mask] = (r - mean) / std
        return advantages

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {k: list(v) for k, v in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size, self.min_count = state["buffer_size"], state["min_count"]
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in state["stats"].items()}
