"""The model and policy sections: which pretrained diffusion model (or toy) is fine-tuned, and which of its
weights train (a LoRA adapter or all of them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from scoreaction.config.base import ConfigSection

ModelPreset = Literal["tiny", "toy-gmm", "sd15", "sd15-random", "digits"]
MODEL_PRESETS: tuple[str, ...] = ("tiny", "toy-gmm", "sd15", "sd15-random", "digits")
DEFAULT_SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ToyConfig(ConfigSection):
    weights: list[float] = Field(
        default_factory=lambda: [0.5, 0.5], description="Mixture weights w_k (sum to 1)."
    )
    means: list[list[float]] = Field(
        default_factory=lambda: [[-2.0], [2.0]],
        description="Component means mu_k, one list of d floats each.",
    )
    std: float | list[float] = Field(
        0.5, description="Isotropic std of each component (one value or one per component)."
    )
    beta_min: float = Field(0.1, gt=0, description="Linear VP schedule: beta(0).")
    beta_max: float = Field(20.0, gt=0, description="Linear VP schedule: beta(1).")
    hidden: int = Field(64, ge=1, description="Width of the policy's correction MLP_theta(t, x).")
    t_end: float = Field(1e-3, gt=0, lt=1, description="Last time of the sampling grid (t runs 1 -> t_end).")


class ModelConfig(ConfigSection):
    preset: ModelPreset = Field(
        "tiny", description="Model preset: tiny, toy-gmm, sd15, sd15-random or digits."
    )
    name_or_path: str | None = Field(
        None,
        description="Hub id or local diffusers folder. sd15: defaults to the SD1.5 hub id; any SD1.x/2.x folder "
        "works. tiny: the folder the tiny pipeline is written to (default: the scoreaction cache).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    device: str = Field(
        "auto", description="Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype of frozen weights and autocast: auto = bfloat16 on CUDA, float32 on CPU.",
    )
    seed: int = Field(
        0,
        description="Seed of the random weights of the tiny and sd15-random presets, and of the digits "
        "pretraining.",
    )
    tf32: bool = Field(True, description="Allow TF32 matmuls and convolutions on CUDA (Ampere and newer).")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile the UNet with this mode (off: eager)."
    )
    toy: ToyConfig = Field(
        default_factory=ToyConfig, description="The toy-gmm preset's mixture and schedule."
    )


class PolicyConfig(ConfigSection):
    mode: Literal["lora", "full"] = Field(
        "lora", description="Train a LoRA adapter (lora) or every UNet weight (full)."
    )
    lora_rank: int = Field(4, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means alpha = rank (scale 1).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet attention projections that receive LoRA layers.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute UNet activations in backward to save memory."
    )
