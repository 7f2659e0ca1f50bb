"""A weighted sum of rewards with per-part normalisation: r = sum_i w_i * n_i(r_i).

n_i is the identity (normalize="none") or a running standardisation (normalize="running"):
n_i(r) = (r - mean_i) / std_i with mean_i, std_i over every image part i has scored so far in this process,
this batch included (Welford's update, population std; std = 1 until two images are seen, and never below
1e-6). Running statistics are updated only by calls without gradient, so the value-gradient estimator's
differentiable calls do not move them.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from scoreaction.rewards.base import Reward, RewardOutput

logger = logging.getLogger(__name__)


class RunningStats:
    """Count, mean and M2 (sum of squared deviations) of a stream of numbers, in float64."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: Tensor) -> None:
        """Chan et al.'s parallel update with a batch x: (B,)."""
        x = x.detach().double().cpu()
        n = x.numel()
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        if self.count < 2:
            return 1.0
        return max(math.sqrt(self.m2 / self.count), 1e-6)


class WeightedSum(Reward):
    """sum_i w_i * n_i(r_i(images, prompts)); info holds every part's raw scores under its name."""

    name = "weighted_sum"

    def __init__(
        self, parts: dict[str, Reward], weights: dict[str, float], normalize: str = "running"
    ) -> None:
        if set(parts) != set(weights):
            raise ValueError(
                f"parts {sorted(parts)} and weights {sorted(weights)} must name the same rewards"
            )
        if normalize not in ("none", "running"):
            raise ValueError(f"reward.normalize={normalize!r}; allowed: none, running")
        self.parts, self.weights, self.normalize = parts, dict(weights), normalize
        self.stats = {k: RunningStats() for k in parts}

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        info: dict[str, Tensor] = {}
        for name, reward in self.parts.items():
            raw = reward.score(images, prompts).scores.float().to(images.device)
            info[name] = raw.detach()
            part = raw
            if self.normalize == "running":
                if not raw.requires_grad:
                    self.stats[name].update(raw)
                s = self.stats[name]
                part = (raw - s.mean) / s.std
            total = total + self.weights[name] * part
        return RewardOutput(total, info)
