"""The data of the ``digits`` preset: scikit-learn's copy of the UCI handwritten digits and its splits.

``sklearn.datasets.load_digits``: 1,797 grey 8x8 images, values 0..16, ink bright on a dark background,
upsampled bilinearly to ``IMAGE_SIZE`` px square RGB in [0, 1]. Each image's prompt is
``"a handwritten digit N"``. A fixed, class-stratified split (``split_indices``) keeps four disjoint parts:

    pretrain  50%  the diffusion model learns from it (scoreaction.models.digits)
    reward    20%  trains the ``digit_classifier`` reward
    monitor   20%  trains the ``digit_classifier_heldout`` monitor (a different model on different data)
    eval      10%  real reference digits of the quality measure (Frechet distance)
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 16
PROMPT_TEMPLATE = "a handwritten digit {}"
PROMPTS: tuple[str, ...] = tuple(PROMPT_TEMPLATE.format(d) for d in range(10))
SPLIT_SEED = 0
SPLITS: dict[str, float] = {"pretrain": 0.5, "reward": 0.2, "monitor": 0.2, "eval": 0.1}


@lru_cache(maxsize=4)
def _load(size: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    gray = torch.from_numpy(np.asarray(data.images, dtype=np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
    images = gray.clamp(0, 1).repeat(1, 3, 1, 1).contiguous()
    return images, torch.from_numpy(np.asarray(data.target, dtype=np.int64))


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (N, 3, size, size) float32 in [0, 1] (ink bright) and their labels (N,) int64."""
    if size < 8 or size % 8:
        raise ValueError(f"size={size!r} must be a multiple of 8 (8, 16, 24, 32...)")
    images, labels = _load(size)
    return images.clone(), labels.clone()


def split_indices(seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Disjoint, class-stratified index sets {pretrain, reward, monitor, eval} covering every digit once."""
    _, labels = _load(8)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {k: [] for k in SPLITS}
    bounds = np.cumsum(list(SPLITS.values()))
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels.numpy() == c))
        cuts = np.round(bounds * len(idx)).astype(int)
        for name, lo, hi in zip(SPLITS, np.r_[0, cuts[:-1]], cuts, strict=True):
            parts[name].extend(idx[lo:hi].tolist())
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in parts.items()}


def digit_split(name: str, size: int = IMAGE_SIZE, seed: int = SPLIT_SEED) -> tuple[Tensor, Tensor]:
    """(images, labels) of one split: pretrain, reward, monitor or eval."""
    if name not in SPLITS:
        raise ValueError(f"split={name!r} is unknown; allowed: {', '.join(SPLITS)}")
    images, labels = load_digit_images(size)
    idx = torch.from_numpy(split_indices(seed)[name])
    return images[idx], labels[idx]
