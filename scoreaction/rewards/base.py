"""What every reward shares: the signature, input checks, device choice and batched scoring.

A reward is called as ``reward(images, prompts) -> scores`` with

    images:  (B, 3, H, W) float in [0, 1]   (decoded terminal samples; any float dtype, any device)
    prompts: list of B strings
    scores:  (B,) float32 on the images' device

and ``reward.score(images, prompts)`` also returns per-image metadata (``RewardOutput.info``: name ->
(B,) tensor), e.g. the raw parts of a weighted sum or the JPEG size in kB. Model rewards run in chunks of
``batch_size`` on their own device; gradients flow through them when ``images.requires_grad`` (the value
gradient estimator needs grad_x R), otherwise they run under ``torch.no_grad``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

RewardFn = Callable[[Tensor, list[str]], Tensor]


class RewardError(ValueError):
    """Bad reward input or configuration. The message names the field, the value and what is allowed."""


@dataclass
class RewardOutput:
    """scores: (B,) float32; info: per-image metadata, name -> (B,) tensor."""

    scores: Tensor
    info: dict[str, Tensor] = field(default_factory=dict)


def check_images(images: Tensor, prompts: list[str] | None = None) -> None:
    """Raise RewardError unless images is (B, 3, H, W) floating point in [0, 1] (and prompts has B strings)."""
    if not isinstance(images, Tensor):
        raise RewardError(
            f"images must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(images).__name__}"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise RewardError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise RewardError(
            f"images must be floating point in [0, 1], got dtype {images.dtype} "
            "(uint8 images: divide by 255 first)"
        )
    if images.numel():
        lo, hi = float(images.detach().min()), float(images.detach().max())
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise RewardError(
                f"images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                "(images in [-1, 1]: map them with x / 2 + 0.5)"
            )
    if prompts is not None:
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            got = repr(prompts) if isinstance(prompts, str) else f"{len(prompts)} prompts"
            raise RewardError(
                f"prompts must be a list of {images.shape[0]} strings (one per image), got {got}"
            )


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as torch.device (errors name reward.device)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RewardError(
            f"reward.device={device!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RewardError(f"reward.device={device!r} but CUDA is not available here; use auto or cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    out = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if out != torch.float32 and device.type != "cuda":
        raise RewardError(
            f"reward.dtype={dtype!r} needs a CUDA device (reward models run in float32 on {device})"
        )
    return out


class Reward:
    """A reward: subclasses implement ``_score(images, prompts) -> (B,)`` on already-checked inputs."""

    name: str = "reward"

    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        return self.score(images, prompts).scores

    def score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        check_images(images, prompts)
        return self._score(images, list(prompts))

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        raise NotImplementedError


class ModelReward(Reward):
    """A reward computed by a torch model: chunks of ``batch_size`` on ``device``, grad only when needed."""

    def __init__(
        self, device: torch.device, dtype: torch.dtype = torch.float32, batch_size: int = 16
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        """pixels: (b, 3, H, W) float32 in [0, 1] on self.device -> scores (b,) float32."""
        raise NotImplementedError

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        out = []
        with torch.set_grad_enabled(images.requires_grad and torch.is_grad_enabled()):
            for i in range(0, images.shape[0], self.batch_size):
                chunk = images[i : i + self.batch_size].to(self.device, torch.float32)
                scores = self.forward(chunk, prompts[i : i + self.batch_size]).float()
                out.append(scores.to(images.device))
        scores = torch.cat(out) if out else torch.zeros(0, device=images.device)
        return RewardOutput(scores)


def as_reward(fn: Callable[[Tensor, list[str]], Tensor], name: str) -> Reward:
    """Wrap a plain function (images, prompts) -> (B,) as a Reward (checks inputs, no metadata)."""

    class _FnReward(Reward):
        def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
            return RewardOutput(fn(images, prompts).float())

    r = _FnReward()
    r.name = name
    return r
