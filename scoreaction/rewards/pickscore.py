"""PickScore (Kirstain et al., 2023): a CLIP-H model fine-tuned on Pick-a-Pic preferences, via transformers.

As in the authors' README: ``AutoModel.from_pretrained("yuvalkirstain/PickScore_v1")`` with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (text: ``padding=True, truncation=True, max_length=77``; images:
CLIPImageProcessor = bicubic resize of the shortest edge to 224, centre crop 224, CLIP mean/std); the score is
``logit_scale.exp() * <image_emb, text_emb>`` of L2-normalised projections (about 18-23 for SD images).

Weights are read as safetensors only (``use_safetensors=True``); a folder with only ``pytorch_model.bin``
converts once with ``jobs/convert_reward_weights.py transformers DIR``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor

from scoreaction.rewards.base import ModelReward, RewardError, resolve_device, resolve_dtype
from scoreaction.rewards.preprocess import clip_preprocess
from scoreaction.rewards.weights import CONVERT_HINT, refuse_pickle_weights

logger = logging.getLogger(__name__)


def _features(out) -> Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projection; 4.x a tensor."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _from_pretrained(cls, spec: str, field: str, **kwargs):
    path = Path(spec).expanduser()
    if path.exists():
        refuse_pickle_weights(path, field, "transformers")
    try:
        return cls.from_pretrained(str(path) if path.exists() else spec, **kwargs)
    except (OSError, ValueError) as exc:
        where = "folder" if path.exists() else "hub id"
        raise RewardError(
            f"reward.{field}={spec!r}: could not load it as a {where} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}). Offline, download the repo where there is network and set "
            f"reward.{field} to the local folder; a folder with only pytorch_model.bin converts with: "
            + CONVERT_HINT.format(kind="transformers").replace(" OUT.safetensors", "")
        ) from None


def _field(size, key: str):
    """A key of an image processor's size (a dict in 4.x, a SizeDict in 5.x, or an int)."""
    if isinstance(size, int):
        return size
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class PickScoreReward(ModelReward):
    """pickscore = exp(logit_scale) * cos(E_img(x), E_txt(prompt)): (B,)."""

    name = "pickscore"

    def __init__(self, model, tokenizer, image_processor, device, dtype, batch_size: int) -> None:
        super().__init__(device, dtype, batch_size)
        self.model, self.tokenizer = model, tokenizer
        crop, resize = image_processor.crop_size, image_processor.size
        self.size = int(_field(crop, "height"))
        shortest = int(_field(resize, "shortest_edge") or self.size)
        if int(shortest) != self.size:
            raise RewardError(
                f"reward.pickscore.processor resizes to {shortest} and crops {self.size}: only equal sizes "
                "(the published 224/224) are supported"
            )
        self.mean = tuple(image_processor.image_mean)
        self.std = tuple(image_processor.image_std)

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        x = clip_preprocess(pixels, self.size, self.mean, self.std).to(self.dtype)
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = _features(self.model.get_image_features(pixel_values=x)).float()
        txt = _features(
            self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device),
                attention_mask=tok["attention_mask"].to(self.device),
            )
        ).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


def build_pickscore(cfg) -> PickScoreReward:
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    dev = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, dev)
    o = cfg.pickscore
    model = _from_pretrained(CLIPModel, o.model, "pickscore.model", use_safetensors=True, dtype=dtype)
    tokenizer = _from_pretrained(CLIPTokenizer, o.processor, "pickscore.processor")
    image_processor = _from_pretrained(CLIPImageProcessor, o.processor, "pickscore.processor")
    model = model.to(dev).eval().requires_grad_(False)
    logger.info("loaded PickScore from %s on %s", o.model, dev)
    return PickScoreReward(model, tokenizer, image_processor, dev, dtype, cfg.batch_size)
