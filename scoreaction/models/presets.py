"""Model presets: SD-architecture pipelines that load the way users load them.

- ``tiny``: SD1.5's component classes at tiny sizes, seeded, written once as a standard diffusers folder
  (safetensors) and loaded back through ``from_pretrained`` -- the same path as a real model.
- ``sd15-random``: the exact SD1.5 configs (UNet 860M, VAE, CLIP ViT-L/14 text encoder), random weights;
  for measuring memory and speed without the weights.
- ``digits``: the same classes at small sizes, pretrained on scikit-learn's handwritten digits
  (scoreaction/models/digits.py), cached like ``tiny``.
- ``sd15``: a hub id or a local diffusers folder (any SD1.x/2.x, epsilon or v-prediction).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from scoreaction.config import DEFAULT_SD15_ID, MODEL_PRESETS, ConfigError, ModelConfig
from scoreaction.models.tokenizer import VOCAB_SIZE, build_clip_tokenizer

logger = logging.getLogger(__name__)

TINY_VERSION = "v1"

# SD1.5's scheduler: 1000 DDPM steps, scaled_linear betas 0.00085 -> 0.012.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_TEXT_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)

# Tiny: the same classes and block types, small widths. Latents 8x8 -> 64x64 px images.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)

TINY_TEXT_CONFIG = dict(
    SD15_TEXT_CONFIG,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
)


def default_cache_dir() -> Path:
    """$SCOREACTION_CACHE, else ~/.cache/scoreaction."""
    return Path(os.environ.get("SCOREACTION_CACHE", Path.home() / ".cache" / "scoreaction"))


def build_components(
    unet_config: dict, vae_config: dict, text_config: dict, tokenizer_dir: str | Path, seed: int
) -> StableDiffusionPipeline:
    """Random, seeded SD pipeline from component configs (in memory). The global RNG is left as it was, so
    whether a cache had to be written never changes what the caller draws next."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**vae_config)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(tokenizer_dir),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors), atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory() as tok_dir:
            pipe = build_components(TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_CONFIG, tok_dir, seed)
            pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, directory)
        except OSError:  # another process won the race; its folder is identical
            if not (directory / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def tiny_pipeline_dir(seed: int = 0) -> Path:
    """Folder of the tiny pipeline for this seed, written on first use."""
    directory = default_cache_dir() / "models" / f"tiny-{TINY_VERSION}-seed{seed}"
    if not (directory / "model_index.json").is_file():
        logger.info("writing the tiny pipeline to %s", directory)
        write_tiny_pipeline(directory, seed)
    return directory


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"model.device={name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name!r} but CUDA is not available on this machine; use cpu or auto")
    return device


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def from_pretrained(
    name_or_path: str, revision: str | None = None, torch_dtype=None
) -> StableDiffusionPipeline:
    """Load an SD1.x/2.x diffusers pipeline from a folder or hub id, safetensors only, with a clear error
    when it cannot be found (e.g. offline and not cached)."""
    if name_or_path.lower().endswith(_PICKLE_SUFFIXES + (".safetensors",)) and Path(name_or_path).is_file():
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is a single checkpoint file; give a diffusers folder "
            "(model_index.json, unet/, vae/, ...) or a hub id"
        )
    is_dir = Path(name_or_path).is_dir()
    if is_dir and not (Path(name_or_path) / "model_index.json").is_file():
        raise ConfigError(
            f"model.name_or_path={name_or_path!r} is a folder without model_index.json: not a diffusers pipeline"
        )
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path,
            revision=revision,
            torch_dtype=torch_dtype,
            use_safetensors=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = (
            "the Hugging Face hub is unreachable (or HF_HUB_OFFLINE is set) and no cached copy exists. "
            if offline or not is_dir
            else ""
        )
        raise ConfigError(
            f"could not load model.name_or_path={name_or_path!r}: {hint}Download it where there is network "
            f"(`huggingface-cli download {name_or_path} --local-dir DIR`, or copy a diffusers folder) and set "
            f"--set model.name_or_path=DIR. Only safetensors weights are accepted. Cause: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def load_pipeline(cfg: ModelConfig) -> StableDiffusionPipeline:
    """The pipeline of a model preset, on CPU in float32 (the policy moves and casts it)."""
    if cfg.preset == "tiny":
        directory = cfg.name_or_path or str(tiny_pipeline_dir(cfg.seed))
        if cfg.name_or_path and not (Path(directory) / "model_index.json").is_file():
            write_tiny_pipeline(directory, cfg.seed)
        return from_pretrained(directory)
    if cfg.preset == "digits":
        from scoreaction.models.digits import digits_pipeline_dir

        if cfg.name_or_path:  # a digits folder of the user's (e.g. rebuilt by jobs/pretrain.py)
            return from_pretrained(cfg.name_or_path)
        return from_pretrained(str(digits_pipeline_dir(cfg.seed)))
    if cfg.preset == "sd15-random":
        with tempfile.TemporaryDirectory() as tok_dir:
            return build_components(SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_CONFIG, tok_dir, cfg.seed)
    if cfg.preset == "sd15":
        return from_pretrained(cfg.name_or_path or DEFAULT_SD15_ID, revision=cfg.revision)
    raise ConfigError(f"model.preset={cfg.preset!r} is unknown; allowed presets: {', '.join(MODEL_PRESETS)}")
