"""A diffusers-style model card (``README.md``) for each checkpoint folder, so a LoRA or UNet is usable in
plain diffusers without reading scoreaction's code: YAML front matter the Hugging Face hub reads
(``base_model``, ``library_name: diffusers``, tags) and a few lines on what was trained and how to load it.

``base_model`` is a loadable id or folder: the model's ``name_or_path`` when set, else the preset's cached
diffusers folder (``tiny``, ``digits``) or SD1.5's hub id (``sd15``). ``sd15-random`` has no folder (it is
built in memory), so its card names the preset and says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"


def loadable_base(model: dict[str, Any]) -> tuple[str, bool]:
    """(what ``StableDiffusionPipeline.from_pretrained`` loads as the base, whether it is loadable) for a
    model config dict."""
    preset, path, seed = model.get("preset", ""), model.get("name_or_path"), int(model.get("seed", 0) or 0)
    if path:
        return str(path), True
    if preset == "tiny":
        from scoreaction.models.presets import tiny_pipeline_dir

        return str(tiny_pipeline_dir(seed)), True
    if preset == "digits":
        from scoreaction.models.digits import digits_pipeline_dir

        return str(digits_pipeline_dir(seed)), True
    if preset == "sd15":
        from scoreaction.config import DEFAULT_SD15_ID

        return DEFAULT_SD15_ID, True
    return str(preset or "unknown"), False


def model_card(meta: dict[str, Any]) -> str:
    """The README.md text of a checkpoint from its checkpoint.json metadata (kind, step, config)."""
    cfg = meta.get("config") or {}
    model, reward, alg = cfg.get("model") or {}, cfg.get("reward") or {}, cfg.get("algorithm") or {}
    run, sampler = cfg.get("run") or {}, cfg.get("sampler") or {}
    base, loadable = loadable_base(model) if model else (str(meta.get("base_model", "")), False)
    kind, step = meta.get("kind", ""), int(meta.get("step", 0))
    algorithm = str(alg.get("name", "unknown"))
    reward_name = str(reward.get("name", "unknown"))
    tags = [
        "diffusers",
        "stable-diffusion",
        "text-to-image",
        "scoreaction",
        algorithm,
        "reinforcement-learning",
    ]
    tags += ["lora"] if kind == "lora" else []
    front = [
        "---",
        f"base_model: {json.dumps(base)}",
        "library_name: diffusers",
        "pipeline_tag: text-to-image",
        "tags:",
        *(f"- {t}" for t in tags),
        "---",
    ]
    epochs = run.get("epochs")
    samples = step * int(run.get("num_samples", 0) or 0)
    lines = [
        f"# {model.get('preset', 'diffusion')} fine-tuned with {algorithm.upper()} (scoreaction)",
        "",
        f"- base model: `{base}`" + ("" if loadable else " (built in memory: no folder to load)"),
        f"- reward: `{reward_name}`"
        + (f", monitored by {', '.join(reward.get('monitor') or [])}" if reward.get("monitor") else ""),
        f"- algorithm: `{algorithm}` ({alg.get('estimator', '')}), learning rate {alg.get('learning_rate')}, "
        f"KL coefficient {alg.get('kl_coef')}",
        f"- steps: epoch {step}" + (f" of {epochs}" if epochs else "") + f", {samples} trajectories sampled",
        f"- sampler: {sampler.get('num_steps')} steps, guidance {sampler.get('guidance_scale')}, "
        f"eta {sampler.get('eta')}",
        f"- weights: {'LoRA of the UNet (rank ' + str((meta.get('lora') or {}).get('rank')) + ')' if kind == 'lora' else 'the full UNet'}, safetensors",
        "",
        "## Use with diffusers",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        f"pipe = StableDiffusionPipeline.from_pretrained({base!r})",
    ]
    if kind == "lora":
        lines.append('pipe.load_lora_weights("path/to/this/folder")')
    else:
        lines += [
            "from diffusers import UNet2DConditionModel",
            'pipe.unet = UNet2DConditionModel.from_pretrained("path/to/this/folder/unet")',
        ]
    lines += ["```", ""]
    return "\n".join(front + [""] + lines)


def write_model_card(directory: str | Path, meta: dict[str, Any]) -> Path | None:
    """Write README.md into a checkpoint folder (lora and full kinds; the toy policy gets none)."""
    if meta.get("kind") not in ("lora", "full"):
        return None
    path = Path(directory) / CARD_FILE
    try:
        text = model_card(meta)
    except Exception as exc:  # a card is documentation: it never costs the checkpoint
        logger.warning("no model card for %s: %s: %s", directory, type(exc).__name__, exc)
        return None
    path.write_text(text)
    return path
