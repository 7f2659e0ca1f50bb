"""Rewards without weights: JPEG (in)compressibility as in DDPO, and the toy's linear reward."""

from __future__ import annotations

import io

import torch
from PIL import Image
from torch import Tensor

from scoreaction.rewards.base import Reward, RewardError, RewardFn, RewardOutput, check_images

JPEG_QUALITY = 95  # DDPO's jpeg_compressibility / jpeg_incompressibility


def jpeg_size_kb(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """Size in kB (1000 bytes) of each image saved as JPEG at the given quality, as in DDPO: (B,).

    images: (B, 3, H, W) float in [0, 1]; each is rounded to uint8 (x * 255, round) before encoding.
    """
    check_images(images)
    arr = (
        (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    )
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def jpeg_compressibility(images: Tensor, prompts: list[str]) -> Tensor:
    """Negative JPEG size in kB: smaller files score higher. (B,)"""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images: Tensor, prompts: list[str]) -> Tensor:
    """JPEG size in kB: larger files score higher. (B,)"""
    return jpeg_size_kb(images)


class JpegReward(Reward):
    """sign * JPEG kB at quality 95 (sign -1: compressibility, +1: incompressibility); info["jpeg_kb"]."""

    def __init__(self, name: str, sign: float) -> None:
        self.name, self.sign = name, sign

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        kb = jpeg_size_kb(images)
        return RewardOutput(self.sign * kb, {"jpeg_kb": kb})


def linear_reward(direction: list[float]) -> RewardFn:
    """r(x) = a^T x on toy states x: (B, d)."""
    a = torch.tensor(direction, dtype=torch.float32)

    def reward(x: Tensor, prompts: list[str]) -> Tensor:
        if x.dim() != 2 or x.shape[1] != a.numel():
            raise RewardError(f"linear reward expects states of shape (B, {a.numel()}), got {tuple(x.shape)}")
        return x.float() @ a.to(x.device)

    return reward
