"""open_clip models for the CLIP-family rewards, loaded from safetensors only; and the ``clip_score`` reward.

Where an open_clip model comes from (the same files open_clip's ``hf-hub:`` loader reads):

- ``weights`` = a folder holding ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``)
  and ``open_clip_model.safetensors``: the published hub layout (e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``,
  ``timm/vit_large_patch14_clip_224.openai``); or such a hub repo id; or a bare ``.safetensors`` file, with
  the architecture from ``model`` (an open_clip name such as ``ViT-L-14``);
- ``weights`` unset: the hub repo open_clip lists for the ``pretrained`` tag (e.g. ``ViT-L-14`` + ``openai``).

The model is built from its config with random weights and the state dict is loaded strictly; open_clip's own
checkpoint loader (which falls back to pickles) is not used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from scoreaction.rewards.base import ModelReward, RewardError
from scoreaction.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from scoreaction.rewards.weights import load_into, load_safetensors, resolve_file

logger = logging.getLogger(__name__)

OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors",)
OPEN_CLIP_CONFIG = "open_clip_config.json"


@dataclass
class OpenClip:
    """A loaded open_clip model with its tokenizer and preprocessing constants."""

    model: torch.nn.Module
    tokenizer: object  # open_clip.SimpleTokenizer: list[str] -> (B, context_length) int64
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "shortest"

    def pixels(self, images: Tensor, mode: str | None = None) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised (B, 3, S, S) as the model's authors preprocess."""
        return clip_preprocess(images, self.image_size, self.mean, self.std, mode or self.resize_mode)

    def tokens(self, prompts: list[str], device: torch.device) -> Tensor:
        return self.tokenizer(prompts).to(device)


def _hub_of_tag(arch: str, tag: str, field: str) -> str:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise RewardError(
            f"reward.{field}={tag!r} is not an open_clip pretrained tag of {arch!r}; allowed: {', '.join(tags)} "
            "(or set the weights field to a local file/folder)"
        )
    hub = open_clip.get_pretrained_cfg(arch, tag).get("hf_hub", "")
    if not hub:
        raise RewardError(
            f"open_clip has no hub repo for {arch!r}/{tag!r}; set the weights field to a local file"
        )
    return hub.rstrip("/")


def load_open_clip(
    arch: str,
    pretrained: str | None,
    weights: str | None,
    field: str,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    kind: str = "open_clip",
    filenames: tuple[str, ...] = OPEN_CLIP_WEIGHTS,
) -> OpenClip:
    """Build an open_clip model and load its safetensors weights (see the module docstring).

    field: the config prefix naming the weights in errors, e.g. "clip_score.weights".
    """
    import open_clip
    from open_clip.model import CLIP

    tag_field = field.replace("weights", "pretrained")  # clip_score.pretrained, aesthetic.clip_pretrained
    hub = _hub_of_tag(arch, pretrained, tag_field) if pretrained and not weights else None
    spec = weights or hub
    path = resolve_file(spec, field, filenames, kind)
    cfg_path = path.parent / OPEN_CLIP_CONFIG
    if not cfg_path.is_file() and not Path(spec).expanduser().exists():
        try:  # a hub repo: fetch its config too (it lands next to the weights in the cache)
            cfg_path = resolve_file(spec, field, (OPEN_CLIP_CONFIG,), kind)
        except RewardError:
            pass
    preprocess: dict = {}
    if cfg_path.is_file():
        data = json.loads(cfg_path.read_text())
        model_cfg, preprocess = dict(data["model_cfg"]), data.get("preprocess_cfg", {})
    else:
        model_cfg = open_clip.get_model_config(arch)
        if model_cfg is None:
            raise RewardError(
                f"reward.{field}: open_clip has no architecture {arch!r}; e.g. ViT-L-14, ViT-H-14"
            )
        model_cfg = dict(model_cfg)
    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained) if pretrained and not cfg_path.is_file() else {}
    quick_gelu = bool(model_cfg.pop("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    if model_cfg.pop("custom_text", False) or "hf_model_name" in model_cfg.get("text_cfg", {}):
        raise RewardError(
            f"reward.{field}: open_clip models with a Hugging Face text tower are not supported"
        )
    model = CLIP(**model_cfg, quick_gelu=quick_gelu)
    state = load_safetensors(path, field)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    load_into(model, state, field, path)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"].get("context_length", 77))
    mean = tuple(preprocess.get("mean") or tag_cfg.get("mean") or OPENAI_CLIP_MEAN)
    std = tuple(preprocess.get("std") or tag_cfg.get("std") or OPENAI_CLIP_STD)
    logger.info("loaded open_clip %s from %s on %s", arch, path, device)
    return OpenClip(model, tokenizer, int(size), mean, std, preprocess.get("resize_mode", "shortest"))


def write_open_clip_folder(model: torch.nn.Module, model_cfg: dict, directory: str | Path) -> Path:
    """Save an open_clip model in the published hub layout (config JSON + safetensors); for tests/tools."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD}}
    (d / OPEN_CLIP_CONFIG).write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / OPEN_CLIP_WEIGHTS[0]))
    return d


class ClipScore(ModelReward):
    """clip_score = cos(E_img(x), E_txt(prompt)), open_clip embeddings L2-normalised; in [-1, 1]. (B,)"""

    name = "clip_score"

    def __init__(self, clip: OpenClip, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        super().__init__(device, dtype, batch_size)
        self.clip = clip

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        x = self.clip.pixels(pixels).to(self.dtype)
        img = self.clip.model.encode_image(x, normalize=True).float()
        txt = self.clip.model.encode_text(self.clip.tokens(prompts, self.device), normalize=True).float()
        return (img * txt).sum(-1)


def build_clip_score(cfg) -> ClipScore:
    from scoreaction.rewards.base import resolve_device, resolve_dtype

    dev = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, dev)
    o = cfg.clip_score
    clip = load_open_clip(o.model, o.pretrained, o.weights, "clip_score.weights", dev, dtype)
    return ClipScore(clip, dev, dtype, cfg.batch_size)
