"""The before/after comparison of an image run: the base model and the tuned checkpoint on the same seeds.

``before_after(cfg, checkpoint, path)`` loads the base pipeline (``load_pipeline(cfg.model)``), samples
``per_prompt`` images for each of the run's prompts (at most ``max_prompts``, in order) with the run's
sampler settings (steps, guidance, eta, size), then loads the checkpoint into the same pipeline the way a
user of plain diffusers would (``load_lora_weights`` for a LoRA, the ``unet/`` folder for a full fine-tune)
and samples again from the same starting noise. The grid (one row per prompt, labelled; the base samples
left, the tuned ones right) is written as a PNG with matplotlib.

For the ``digits`` model it also measures how often each model draws the prompted digit by the held-out
classifier (and the reward classifier, the Frechet distance and the diversity: ``rewards.digits.base_quality``)
on ``accuracy_per_digit`` samples of each digit, the same seeds for both. The result is a JSON-ready dict.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scoreaction.checkpoint import LORA_FILE, read_metadata

logger = logging.getLogger(__name__)

BEFORE_AFTER_FILE = "before_after.png"


def _sample(pipe, prompts: list[str], cfg, seed: int) -> Tensor:
    """Images (len(prompts), 3, H, W) in [0, 1], the i-th from the i-th draw of one seeded generator."""
    s = cfg.sampler
    out = pipe(
        prompts,
        num_inference_steps=s.num_steps,
        guidance_scale=s.guidance_scale,
        eta=s.eta,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        height=s.height,
        width=s.width,
    ).images
    return out.float().clamp(0, 1).cpu()


def load_tuned(pipe, checkpoint: str | Path) -> None:
    """Load a checkpoint into a diffusers pipeline in place, as plain diffusers does (no scoreaction code
    between): a LoRA through ``load_lora_weights``, a full fine-tune by replacing the UNet."""
    checkpoint = Path(checkpoint)
    kind = read_metadata(checkpoint)["kind"]
    if kind == "lora":
        pipe.load_lora_weights(str(checkpoint), weight_name=LORA_FILE)
    elif kind == "full":
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet", use_safetensors=True)
    else:
        raise ValueError(f"checkpoint {str(checkpoint)!r} is kind={kind!r}; allowed: 'lora', 'full'")


def write_grid(before: Tensor, after: Tensor, prompts: list[str], path: str | Path, title: str = "") -> Path:
    """A labelled grid: row i is prompts[i], its per_prompt base samples left of its tuned samples. before
    and after: (len(prompts) * per_prompt, 3, H, W) in [0, 1], prompt-major."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(prompts)
    if rows == 0 or before.shape != after.shape or before.shape[0] % rows:
        raise ValueError(
            f"before {tuple(before.shape)} and after {tuple(after.shape)} must be equal and hold "
            f"len(prompts)={rows} rows of images"
        )
    per = before.shape[0] // rows
    fig, axes = plt.subplots(
        rows, 2 * per + 1, figsize=(1.0 * (2 * per + 1) + 1.6, 1.0 * rows + 0.6), squeeze=False
    )
    for r, prompt in enumerate(prompts):
        for c in range(2 * per + 1):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == per:  # the gap between base and tuned
                ax.axis("off")
                continue
            img = (before if c < per else after)[r * per + (c if c < per else c - per - 1)]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            if r == 0 and c in (0, per + 1):
                ax.set_title("base" if c == 0 else "tuned", fontsize=9, loc="left")
        axes[r][0].set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def before_after(
    cfg,
    checkpoint: str | Path,
    path: str | Path,
    per_prompt: int = 4,
    max_prompts: int = 10,
    seed: int = 12345,
    accuracy_per_digit: int = 20,
) -> dict[str, Any]:
    """Write the before/after grid of cfg's base model and checkpoint to path; returns {grid, checkpoint,
    prompts, per_prompt, seed, seconds} and, for the digits model, {base, tuned}: base_quality of each."""
    from scoreaction.models.presets import load_pipeline

    if per_prompt < 1 or max_prompts < 1:
        raise ValueError(f"per_prompt={per_prompt!r} and max_prompts={max_prompts!r} must be >= 1")
    t0 = time.perf_counter()
    prompts = list(dict.fromkeys(cfg.run.prompts))[:max_prompts]
    repeated = [p for p in prompts for _ in range(per_prompt)]
    digits = cfg.model.preset == "digits"
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "prompts": prompts, "per_prompt": per_prompt}
    quality: dict[str, dict] = {}

    def measure(which: str) -> Tensor:
        if digits:
            from scoreaction.rewards.digits import base_quality

            s = cfg.sampler
            quality[which] = base_quality(
                pipe, accuracy_per_digit, seed, s.num_steps, s.guidance_scale, s.eta
            )
        return _sample(pipe, repeated, cfg, seed)

    before = measure("base")
    load_tuned(pipe, checkpoint)
    after = measure("tuned")
    title = f"{cfg.algorithm.name} on {cfg.model.preset}: base (left) vs tuned (right), same seeds"
    if digits:
        b, a = quality["base"]["accuracy_heldout"], quality["tuned"]["accuracy_heldout"]
        title += f"\nheld-out classifier sees the prompted digit: {b:.0%} -> {a:.0%}"
        out.update(quality)
    out["grid"] = str(write_grid(before, after, prompts, path, title))
    out.update(seed=seed, seconds=time.perf_counter() - t0)
    logger.info("before/after grid -> %s (%.1f s)", path, out["seconds"])
    return out
