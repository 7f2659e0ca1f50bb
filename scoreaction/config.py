"""Run configuration: pydantic models with one documented field per knob, presets, YAML and --set overrides.

Every field's description becomes ``--help`` text. Names follow ../shared/ALGORITHM.md.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

ModelPreset = Literal["tiny", "sd15", "sd15-random"]
MODEL_PRESETS: tuple[str, ...] = ("tiny", "sd15", "sd15-random")
DEFAULT_SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    preset: ModelPreset = Field("tiny", description="Model preset: tiny, sd15 or sd15-random.")
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
    seed: int = Field(0, description="Seed of the random weights of the tiny and sd15-random presets.")


class PolicyConfig(_Section):
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


class SamplerConfig(_Section):
    stepper: Literal["ddim", "euler_maruyama"] = Field(
        "ddim",
        description="Transition kernel: ddim (DDIM-eta; eta=1 is DDPM) or euler_maruyama on the reverse SDE.",
    )
    num_steps: int = Field(50, ge=1, le=1000, description="Number of denoising steps N.")
    eta: float = Field(
        1.0, gt=0.0, le=1.0, description="Reverse-process family member, in (0, 1]; 1 = reverse SDE."
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


class RunConfig(_Section):
    seed: int = Field(0, description="Seed of sampling noise, prompts and initialisation.")
    output_dir: str = Field("outputs/run", description="Where checkpoints, logs, grids and summary.json go.")
    num_samples: int = Field(16, ge=1, description="Trajectories per epoch (demo: images in the grid).")
    prompts: list[str] = Field(
        default_factory=lambda: [
            "a photo of a cat",
            "a watercolor painting of a lighthouse",
            "a red bicycle leaning on a wall",
            "a bowl of ramen, studio lighting",
        ],
        description="Prompt set sampled from (round robin).",
    )


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    run: RunConfig = Field(default_factory=RunConfig)


# --------------------------------------------------------------------------------------------------
# Presets (functions, so each call returns a fresh dict)
# --------------------------------------------------------------------------------------------------


def _tiny() -> dict[str, Any]:
    return {"model": {"preset": "tiny"}, "sampler": {"num_steps": 20, "guidance_scale": 5.0}}


def _sd15() -> dict[str, Any]:
    return {
        "model": {"preset": "sd15", "name_or_path": DEFAULT_SD15_ID},
        "policy": {"gradient_checkpointing": True},
        "sampler": {"num_steps": 50, "guidance_scale": 7.0, "batch_size": 4},
    }


def _sd15_random() -> dict[str, Any]:
    cfg = _sd15()
    cfg["model"] = {"preset": "sd15-random"}
    return cfg


PRESETS = {"tiny": _tiny, "sd15": _sd15, "sd15-random": _sd15_random}


def preset(name: str) -> dict[str, Any]:
    """The override dict of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; allowed presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def parse_set(item: str) -> dict[str, Any]:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}; the value parses as YAML (lists, numbers, null...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set key {key!r} is not a dotted name such as sampler.num_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}={raw!r}: the value is not valid YAML ({exc})") from exc
    out: dict[str, Any] = value
    for p in reversed(parts):
        out = {p: out}
    return out


def format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        lines.append(f"{loc}={err.get('input')!r}: {err['msg']}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_config(
    preset_name: str = "tiny", config_file: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """Preset, then YAML file, then --set overrides, validated. Raises ConfigError naming each bad field."""
    data = preset(preset_name)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r} must hold a YAML mapping, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    for item in overrides or []:
        data = _merge(data, parse_set(item))
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
