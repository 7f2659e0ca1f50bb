"""ImageReward v1.0 (Xu et al., 2023), the paper's reward: BLIP (ViT-L/16 + BERT with cross-attention) + MLP.

Our own loader, on transformers' BLIP modules: the ``image-reward`` package (1.5, 2023) does not import with
transformers 5 (its BLIP code imports helpers transformers has removed) and pins timm 0.6.13 and fairscale.
The computation is ``ImageReward.score`` / ``score_gard`` of that package:

    pixels  = Normalize(CLIP mean/std)(CenterCrop(224)(Resize(224, BICUBIC)(image)))
    tokens  = BertTokenizer(bert-base-uncased + [DEC], [ENC])(prompt, padding="max_length",
              truncation=True, max_length=35)                         # first token stays [CLS]
    img     = blip.visual_encoder(pixels)                              # (B, 1 + 196, 1024)
    txt     = blip.text_encoder(tokens, encoder_hidden_states=img).last_hidden_state[:, 0]   # (B, 768)
    reward  = (mlp(txt) - 0.16717362830052426) / 1.0333394966054072

Weights: ``ImageReward.pt`` (a pickled state dict) converted once to ``ImageReward.safetensors`` with the same
keys, next to the published ``med_config.json`` (the BERT config). Published key layout -> transformers:

    blip.visual_encoder.cls_token                 -> vision.embeddings.class_embedding
    blip.visual_encoder.pos_embed                 -> vision.embeddings.position_embedding
    blip.visual_encoder.patch_embed.proj.*        -> vision.embeddings.patch_embedding.*
    blip.visual_encoder.blocks.N.norm1|norm2.*    -> vision.encoder.layers.N.layer_norm1|layer_norm2.*
    blip.visual_encoder.blocks.N.attn.qkv|proj.*  -> vision.encoder.layers.N.self_attn.qkv|projection.*
    blip.visual_encoder.blocks.N.mlp.fc1|fc2.*    -> vision.encoder.layers.N.mlp.fc1|fc2.*
    blip.visual_encoder.norm.*                    -> vision.post_layernorm.*
    blip.text_encoder.*                           -> text.*   (BERT names are the same)
    mlp.layers.{0,2,4,6,7}.*                      -> mlp.layers.*   (the aesthetic MLP's layout, 768 in)
    blip.vision_proj.*, blip.text_proj.*, blip.text_encoder.embeddings.position_ids: not used by the score

The ViT's sizes are read from the weights (heads = width / 64 as in BLIP's create_vit, LayerNorm eps 1e-6).
"""

from __future__ import annotations

import json
import logging
import math
import re

import torch
from torch import Tensor, nn

from scoreaction.rewards.aesthetic import AestheticMLP
from scoreaction.rewards.base import ModelReward, RewardError, resolve_device, resolve_dtype
from scoreaction.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess
from scoreaction.rewards.weights import check_keys, load_safetensors, resolve_file

logger = logging.getLogger(__name__)

REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_TEXT_LENGTH = 35
UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids")
_VISION = [
    (r"cls_token$", "embeddings.class_embedding"),
    (r"pos_embed$", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def convert_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Published ImageReward keys -> this module's keys (see the module docstring); unused keys dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith(UNUSED):
            continue
        if k.startswith("blip.visual_encoder."):
            rest = k[len("blip.visual_encoder.") :]
            for pat, rep in _VISION:
                if re.search(pat, rest):
                    rest = re.sub(pat, rep, rest)
                    break
            out["vision." + rest] = v
        elif k.startswith("blip.text_encoder."):
            out["text." + k[len("blip.text_encoder.") :]] = v
        else:
            out[k] = v
    return out


class ImageRewardModel(nn.Module):
    """BLIP vision + text encoders and the reward MLP; ``forward(pixels, input_ids, mask) -> (B,)``."""

    def __init__(self, vision_cfg, text_cfg, mlp_widths: tuple[int, ...]) -> None:
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        self.vision = BlipVisionModel(vision_cfg)
        self.text = BlipTextModel(text_cfg, add_pooling_layer=False)
        self.mlp = AestheticMLP(mlp_widths)

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """pixels: (B, 3, S, S) normalised; input_ids, attention_mask: (B, 35) -> rewards (B,)."""
        img = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + P, D_v), post-LayerNorm
        img_mask = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        txt = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=img,
            encoder_attention_mask=img_mask,
            is_decoder=False,
        ).last_hidden_state[:, 0, :]
        return ((self.mlp(txt.float()) - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def configs_from(state: dict[str, Tensor], med_config: dict):
    """BlipVisionConfig from the weight shapes, BlipTextConfig from med_config.json (BERT config)."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = state["blip.visual_encoder.cls_token"].shape[-1]
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["blip.visual_encoder.pos_embed"].shape[1] - 1)
    depth = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(r"blip\.visual_encoder\.blocks\.(\d+)\.", k))
    )
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 64),
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        attention_dropout=0.0,
    )
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in keys if k not in med_config]
    if missing:
        raise RewardError(f"reward.imagereward.weights: med_config.json lacks {missing}")
    text = BlipTextConfig(
        **{k: med_config[k] for k in keys},
        max_position_embeddings=med_config.get("max_position_embeddings", 512),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        hidden_act=med_config.get("hidden_act", "gelu"),
        pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=width,  # BLIP sets encoder_width = vision width
        is_decoder=True,  # builds the cross-attention layers (med: add_cross_attention)
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return vision, text


def load_imagereward_tokenizer(spec: str):
    """BERT tokenizer + BLIP's special tokens ([DEC] as bos, [ENC] additional), as blip.init_tokenizer."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise RewardError(
            f"reward.imagereward.tokenizer={spec!r}: could not load a BERT tokenizer ({type(exc).__name__}); "
            "offline, save bert-base-uncased's tokenizer files (vocab.txt) to a folder and give its path"
        ) from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(ModelReward):
    """imagereward = (MLP(BLIP(x, prompt)[CLS]) - mean) / std: (B,), about -2 .. 2."""

    name = "imagereward"

    def __init__(self, model: ImageRewardModel, tokenizer, device, dtype, batch_size: int) -> None:
        super().__init__(device, dtype, batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.size = int(model.vision.config.image_size)
        vocab = model.text.config.vocab_size
        if len(tokenizer) > vocab:
            raise RewardError(
                f"reward.imagereward.tokenizer has {len(tokenizer)} tokens but the text encoder {vocab}; "
                "use bert-base-uncased's tokenizer (30522 + [DEC], [ENC] = 30524)"
            )

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        x = clip_preprocess(pixels, self.size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD).to(self.dtype)
        tok = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        return self.model(x, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))


def load_imagereward_model(spec: str | None) -> ImageRewardModel:
    field = "imagereward.weights"
    path = resolve_file(spec, field, ("ImageReward.safetensors",), "imagereward", default_hub=None)
    cfg_path = path.parent / "med_config.json"
    if not cfg_path.is_file():
        raise RewardError(
            f"reward.{field}: {str(cfg_path)!r} is missing; put the published med_config.json "
            "(https://huggingface.co/THUDM/ImageReward) next to ImageReward.safetensors"
        )
    state = load_safetensors(path, field)
    needed = {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed", "mlp.layers.0.weight"}
    check_keys({k: v for k, v in state.items() if k in needed}, needed, field, path)
    vision_cfg, text_cfg = configs_from(state, json.loads(cfg_path.read_text()))
    mlp_state = {k[4:]: v for k, v in state.items() if k.startswith("mlp.")}
    model = ImageRewardModel(vision_cfg, text_cfg, AestheticMLP.from_state_dict(mlp_state).widths)
    converted = convert_keys(state)
    check_keys(converted, set(model.state_dict()), field, path, ignore=("text.embeddings.position_ids",))
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:
        raise RewardError(f"reward.{field}: wrong shapes: {str(exc).splitlines()[-1].strip()}") from None
    return model.eval().requires_grad_(False)


def build_imagereward(cfg) -> ImageReward:
    dev = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, dev)
    o = cfg.imagereward
    model = load_imagereward_model(o.weights).to(dev, dtype)
    model.mlp.float()
    tokenizer = load_imagereward_tokenizer(o.tokenizer)
    logger.info("loaded ImageReward from %s on %s", o.weights, dev)
    return ImageReward(model, tokenizer, dev, dtype, cfg.batch_size)
