"""Rewards chosen by name, one signature: ``reward(images, prompts) -> scores (B,) float32``.

``images`` are decoded terminal samples, (B, 3, H, W) float in [0, 1] (or the toy's states (B, d) for
``linear``); ``reward.score(images, prompts)`` also returns per-image metadata (``RewardOutput.info``).

| name | what | weights |
|---|---|---|
| ``linear`` | toy: r(x) = a^T x | none |
| ``jpeg_compressibility`` / ``jpeg_incompressibility`` | -/+ JPEG kB at quality 95 (DDPO) | none |
| ``aesthetic`` | LAION aesthetic predictor v2: MLP on CLIP ViT-L/14 image embeddings | MLP + open_clip |
| ``clip_score`` | open_clip cosine(image, prompt) | open_clip (model + pretrained tag) |
| ``pickscore`` | PickScore_v1 (CLIP-H, transformers) | transformers folder / hub id |
| ``hpsv2`` | HPSv2 / v2.1 (open_clip ViT-H-14 with HPS weights) | converted .safetensors |
| ``imagereward`` | ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP) | converted .safetensors |
| ``digit_classifier`` | digits preset: log p(prompted digit) under a small CNN (reward split) | trained on first use |
| ``digit_classifier_heldout`` | the same on the disjoint monitor split (for ``reward.monitor``) | trained on first use |
| ``preference`` | Bradley-Terry head on frozen features, fitted on stored comparisons | jobs/train_reward.py |

Model rewards import their dependencies only when built, so a missing optional package matters only
for the reward that needs it. ``reward.weights`` builds a weighted sum (multi.py); ``reward.service``
scores in the shared reward service (service_client.py); ``reward.monitor`` rewards are built by
``build_monitors`` and only logged.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

from scoreaction.config.reward import RewardConfig
from scoreaction.rewards.base import (
    Reward,
    RewardError,
    RewardFn,
    RewardOutput,
    as_reward,
    check_images,
)
from scoreaction.rewards.jpeg import (
    JpegReward,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
    linear_reward,
)
from scoreaction.rewards.multi import WeightedSum

logger = logging.getLogger(__name__)

# name -> "module:builder(cfg: RewardConfig) -> Reward", imported on first use
MODEL_REWARDS: dict[str, str] = {
    "aesthetic": "scoreaction.rewards.aesthetic:build_aesthetic",
    "clip_score": "scoreaction.rewards.clip_models:build_clip_score",
    "pickscore": "scoreaction.rewards.pickscore:build_pickscore",
    "hpsv2": "scoreaction.rewards.hps:build_hps",
    "imagereward": "scoreaction.rewards.imagereward:build_imagereward",
    "digit_classifier": "scoreaction.rewards.digits:build_digit_classifier",
    "digit_classifier_heldout": "scoreaction.rewards.digits:build_digit_classifier_heldout",
    "preference": "scoreaction.rewards.preference:build_preference",
}
IMAGE_REWARDS: tuple[str, ...] = ("jpeg_compressibility", "jpeg_incompressibility", *MODEL_REWARDS)
REWARDS: tuple[str, ...] = ("linear", *IMAGE_REWARDS)


def _unknown(name: str) -> RewardError:
    return RewardError(f"reward name {name!r} is unknown; allowed: {', '.join(REWARDS)}")


def build_named(name: str, cfg: RewardConfig | None = None) -> Reward:
    """One image reward by name, in this process (no service), with options from cfg."""
    cfg = cfg or RewardConfig()
    if name == "jpeg_compressibility":
        return JpegReward(name, -1.0)
    if name == "jpeg_incompressibility":
        return JpegReward(name, 1.0)
    if name not in MODEL_REWARDS:
        if name == "linear":
            raise RewardError("reward 'linear' takes toy states, not images: set reward.name=linear instead")
        raise _unknown(name)
    module, fn = MODEL_REWARDS[name].split(":")
    try:
        builder: Callable[[RewardConfig], Reward] = getattr(importlib.import_module(module), fn)
    except ImportError as exc:
        raise RewardError(
            f"reward {name!r} needs the package {exc.name!r}, which is not installed here: "
            f"pip install {exc.name}"
        ) from exc
    reward = builder(cfg)
    logger.info("built reward %s", name)
    return reward


def _build_part(name: str, cfg: RewardConfig) -> Reward:
    if cfg.service:
        from scoreaction.rewards.service_client import service_reward

        return service_reward(cfg.service, name, cfg)
    return build_named(name, cfg)


def build_reward(cfg: RewardConfig) -> RewardFn:
    """The reward the policy maximises: reward.name, or the weighted sum reward.weights; local or service."""
    if cfg.weights:
        parts = {name: _build_part(name, cfg) for name in cfg.weights}
        return WeightedSum(parts, dict(cfg.weights), cfg.normalize)
    if cfg.name == "linear":
        if cfg.direction is None:
            raise RewardError("reward.direction must be set for reward.name='linear'")
        if cfg.service:
            raise RewardError(f"reward.service={cfg.service!r}: the toy 'linear' reward runs in-process only")
        return linear_reward(cfg.direction)
    if cfg.name not in IMAGE_REWARDS:
        raise _unknown(cfg.name)
    return _build_part(cfg.name, cfg)


def build_monitors(cfg: RewardConfig) -> dict[str, Reward]:
    """The held-out rewards of reward.monitor, {name: reward}: the trainer logs monitor/<name>_mean."""
    return {name: _build_part(name, cfg) for name in cfg.monitor}


__all__ = [
    "IMAGE_REWARDS",
    "MODEL_REWARDS",
    "REWARDS",
    "Reward",
    "RewardError",
    "RewardFn",
    "RewardOutput",
    "WeightedSum",
    "as_reward",
    "build_monitors",
    "build_named",
    "build_reward",
    "check_images",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "linear_reward",
]
