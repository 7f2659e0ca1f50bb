"""The reward section of the run configuration (its own module so the reward registry owns it).

One reward (``name``) or a weighted sum (``weights``), optional held-out rewards that are only logged
(``monitor``), and where they run: in this process (default) or in a shared reward service
(``service``: an HTTP URL or a Ray Serve application name). Each model reward has its own options block
saying where its published weights are (a local path or a hub id).
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from scoreaction.config.base import ConfigSection

RewardName = Literal[
    "linear",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "aesthetic",
    "clip_score",
    "pickscore",
    "hpsv2",
    "imagereward",
    "digit_classifier",
    "digit_classifier_heldout",
    "preference",
]
_APP_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Options(ConfigSection):
    """The options block of one model reward."""


class AestheticOptions(_Options):
    clip_model: str = Field("ViT-L-14", description="open_clip architecture of the image embedder.")
    clip_pretrained: str | None = Field(
        "openai",
        description="open_clip pretrained tag (resolved to its hub repo) when clip_weights is unset.",
    )
    clip_weights: str | None = Field(
        None,
        description="CLIP weights: a .safetensors file, an open_clip folder (open_clip_config.json + "
        "open_clip_model.safetensors) or a hub repo id. Default: the hub repo of clip_pretrained.",
    )
    mlp_weights: str | None = Field(
        None,
        description="The LAION aesthetic MLP (sac+logos+ava1-l14-linearMSE) as .safetensors; convert the "
        "published .pth once with jobs/convert_reward_weights.py aesthetic.",
    )


class ClipScoreOptions(_Options):
    model: str = Field("ViT-L-14", description="open_clip architecture, e.g. ViT-L-14, ViT-H-14, ViT-B-32.")
    pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag (resolved to its hub repo) when weights is unset."
    )
    weights: str | None = Field(
        None, description="A .safetensors file, an open_clip folder or a hub repo id (overrides pretrained)."
    )


class PickScoreOptions(_Options):
    model: str = Field(
        "yuvalkirstain/PickScore_v1", description="PickScore CLIP-H: hub id or local transformers folder."
    )
    processor: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description="Hub id or folder of the processor (tokenizer + image preprocessing) PickScore uses.",
    )


class HPSOptions(_Options):
    version: Literal["v2.0", "v2.1"] = Field("v2.1", description="HPS version (names the default file).")
    weights: str | None = Field(
        None,
        description="HPS weights as .safetensors (convert HPS_v2.1_compressed.pt once with "
        "jobs/convert_reward_weights.py hpsv2), or an open_clip folder holding them.",
    )
    clip_model: str = Field("ViT-H-14", description="open_clip architecture HPS fine-tunes.")


class ImageRewardOptions(_Options):
    weights: str | None = Field(
        None,
        description="Folder with ImageReward.safetensors (convert ImageReward.pt once with "
        "jobs/convert_reward_weights.py imagereward) and med_config.json.",
    )
    tokenizer: str = Field(
        "bert-base-uncased", description="BERT tokenizer (hub id or folder with vocab.txt) BLIP uses."
    )


class PreferenceOptions(_Options):
    path: str | None = Field(
        None,
        description="Folder of a reward fitted on stored human comparisons (preference_head.safetensors + "
        "preference.json), written by python jobs/train_reward.py --preferences URL --output DIR.",
    )


class RewardConfig(ConfigSection):
    name: RewardName = Field(
        "jpeg_compressibility",
        description="Reward to maximise: linear (toy: a^T x), jpeg_(in)compressibility, aesthetic, clip_score, "
        "pickscore, hpsv2, imagereward, digit_classifier (digits preset; digit_classifier_heldout is its "
        "held-out twin for monitor), preference (fitted on the playground's comparisons: "
        "preference.path). Ignored when weights is set.",
    )
    direction: list[float] | None = Field(None, description="The vector a of the linear reward r(x) = a^T x.")
    weights: dict[RewardName, float] | None = Field(
        None, description="Weighted sum of rewards {name: weight}; each part normalised as set by normalize."
    )
    normalize: Literal["none", "running"] = Field(
        "running",
        description="Per-part normalisation of a weighted sum: running = (r - mean) / std over every image "
        "that part has scored so far in this process; none = raw scores.",
    )
    monitor: list[RewardName] = Field(
        default_factory=list, description="Rewards logged each epoch (monitor/<name>_mean) but not optimised."
    )
    service: str | None = Field(
        None,
        description="Score in a shared reward service instead of in-process: an http(s):// URL of the rewards "
        "app, or its Ray Serve application name (inside the same Ray cluster).",
    )
    service_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Deadline of one whole call to the reward service, retries included: while the service "
        "is down, stalls or answers 502/503/504 the client waits and retries (the run pauses) for up to this "
        "long, then the run stops with an error.",
    )
    service_attempt_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest wait for the service's bytes within one attempt (a stalled attempt is retried).",
    )
    service_max_backoff_s: float = Field(
        30.0, gt=0, description="Longest pause between retries when the service sends no Retry-After."
    )
    service_api_key_env: str = Field(
        "SCOREACTION_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the reward service's API key (sent as a Bearer token when "
        "set; the key itself is never part of the config, the logs or error messages).",
    )
    device: str = Field(
        "auto", description="Device of reward models: auto (cuda if available, else cpu), cpu, cuda:1..."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights dtype of reward models (half types on CUDA only)."
    )
    batch_size: int = Field(16, ge=1, description="Images per reward-model forward pass.")
    aesthetic: AestheticOptions = Field(default_factory=AestheticOptions)
    clip_score: ClipScoreOptions = Field(default_factory=ClipScoreOptions)
    pickscore: PickScoreOptions = Field(default_factory=PickScoreOptions)
    hpsv2: HPSOptions = Field(default_factory=HPSOptions)
    imagereward: ImageRewardOptions = Field(default_factory=ImageRewardOptions)
    preference: PreferenceOptions = Field(default_factory=PreferenceOptions)

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must name at least one reward, e.g. {aesthetic: 1.0, clip_score: 0.5}")
        if "linear" in v:
            raise ValueError("'linear' (the toy reward) cannot be part of a weighted sum; use reward.name")
        bad = {k: w for k, w in v.items() if not math.isfinite(w)}
        if bad:
            raise ValueError(f"weights must be finite numbers, got {bad}")
        return v

    @field_validator("service")
    @classmethod
    def _check_service(cls, v: str | None) -> str | None:
        if v is None or v.startswith(("http://", "https://")) or _APP_NAME.match(v):
            return v
        raise ValueError(
            f"{v!r} is neither an http(s):// URL nor a Ray Serve application name (letters, digits, _ . -)"
        )

    @model_validator(mode="after")
    def _check_monitor(self) -> RewardConfig:
        if "linear" in self.monitor:
            raise ValueError(
                "reward.monitor=['linear']: the toy reward cannot be monitored; use image rewards"
            )
        return self

    @property
    def optimised(self) -> dict[str, float]:
        """The rewards the policy maximises and their weights: {name: weight}."""
        return dict(self.weights) if self.weights else {self.name: 1.0}
