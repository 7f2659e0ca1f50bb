"""The sampler section: the reverse process that generates trajectories (stepper, number of steps N, the
family member eta, classifier-free guidance, image size, batch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from scoreaction.config.base import ConfigSection


class SamplerConfig(ConfigSection):
    stepper: Literal["ddim", "euler_maruyama", "heun"] = Field(
        "ddim",
        description="Transition kernel: ddim (DDIM-eta; eta=1 is DDPM), euler_maruyama on the reverse SDE, "
        "or heun (deterministic second-order probability-flow ODE; needs eta=0).",
    )
    num_steps: int = Field(50, ge=1, le=1000, description="Number of denoising steps N.")
    eta: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Reverse-process family member in [0, 1]: 1 = reverse SDE, 0 = deterministic ODE "
        "(no transition log-probs: only the value_gradient estimator trains on it).",
    )
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="Classifier-free guidance weight w.")
    negative_prompt: str = Field("", description="Prompt of the unconditional branch of guidance.")
    height: int | None = Field(
        None, ge=8, le=4096, multiple_of=8, description="Image height in px (default: model's)."
    )
    width: int | None = Field(
        None, ge=8, le=4096, multiple_of=8, description="Image width in px (default: model's)."
    )
    batch_size: int = Field(8, ge=1, description="Trajectories sampled per UNet batch.")
