"""Rewards chosen by name, one signature: (images, prompts) -> scores (B,) float32.

``images`` are decoded terminal samples: (B, 3, H, W) float in [0, 1] for image presets, or the states
(B, d) for toy-gmm. The reward-model registry (aesthetic, CLIP, PickScore, HPSv2, ImageReward) extends
this module.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from scoreaction.reward_config import RewardConfig

RewardFn = Callable[[Tensor, list[str]], Tensor]
REWARDS: tuple[str, ...] = ("linear", "jpeg_compressibility", "jpeg_incompressibility")


def _check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0 or not np.isfinite([lo, hi]).all():
        raise ValueError(f"images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG at the given quality, as in DDPO: (B,)."""
    _check_images(images)
    arr = (
        (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    )
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_compressibility(images: Tensor, prompts: list[str]) -> Tensor:
    """Negative JPEG size: smaller files score higher."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images: Tensor, prompts: list[str]) -> Tensor:
    return jpeg_size_kb(images)


def linear_reward(direction: list[float]) -> RewardFn:
    """r(x) = a^T x on toy states x: (B, d)."""
    a = torch.tensor(direction, dtype=torch.float32)

    def reward(x: Tensor, prompts: list[str]) -> Tensor:
        if x.dim() != 2 or x.shape[1] != a.numel():
            raise ValueError(f"linear reward expects states of shape (B, {a.numel()}), got {tuple(x.shape)}")
        return x.float() @ a.to(x.device)

    return reward


def build_reward(cfg: RewardConfig) -> RewardFn:
    if cfg.name == "linear":
        if cfg.direction is None:
            raise ValueError("reward.direction must be set for reward.name='linear'")
        return linear_reward(cfg.direction)
    if cfg.name == "jpeg_compressibility":
        return jpeg_compressibility
    if cfg.name == "jpeg_incompressibility":
        return jpeg_incompressibility
    raise ValueError(f"reward.name={cfg.name!r} is unknown; allowed: {', '.join(REWARDS)}")
