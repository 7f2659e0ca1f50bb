"""F_phi as the paper's authors built it for SD1.5 + ImageReward (``value.kind = "imagereward"``):

    V(t, x, c) = cos(pi t / 2) * R(x0_hat(t, x), c) + sin(pi t / 2) * F_phi(x, c)
    F_phi(x, c) = ImageReward_phi(decode(x), c)        a copy of the reward model on the decoded noisy state

ImageReward_phi starts as the ImageReward reward model (BLIP ViT-L/16 + BERT with cross-attention + MLP,
``scoreaction.rewards.imagereward``) and learns, except for the lower ``value.frozen_fraction`` of its
layers. R(x0_hat) is supplied by the caller as ``r_x0`` (the optimised reward of the decoded Tweedie
estimate), as for the conv head (``scoreaction.value``).

As in github.com/hanyang1999/ContTimeRL4DM, ddpo_continuous/, commit
82b2ca60aed3585ad68e1d19c9edc7a461740f27 (scripts/src/ImageReward_VN.py ``ImageRewardValue``,
scripts/src/ImageReward_VN_train.py ``load``, ``train_value_batch``; design ``{"first": "denoised",
"second": "original", "skip_func_in": "cos", "skip_func_out": "sin"}`` in config/dgx_with_value_func.py):

    pixels = Normalize(CLIP mean/std)(Resize((224, 224))(clamp((vae.decode(x / 0.18215) + 1) / 2, 0, 1)))
    value  = cos(pi/2 tau/1000) * ImageReward_frozen(decode(x0_hat)) + sin(pi/2 tau/1000) * ImageReward_phi(pixels)

- tau is the DDIM timestep (0 .. 999); ours is t = (tau + 1) / 1000, a shift of 1/1000 in the blend.
- Their frozen copy runs under ``torch.no_grad``, so its grad_x is zero there; ours is the caller's r_x0,
  which carries grad_x R(decode(x0_hat)) when the value-gradient estimator asks for it.
- Frozen layers: their ``freeze_denoised_layers(fix_rate=0.7)`` (ImageReward's own fix_rate rule) walks each
  tower's parameters in order, freezing each, and stops after the first one named ``layer.{int(12 f)}``
  (text) or ``blocks.{int(24 f)}`` (vision): the embeddings, the first int(n f) layers, and the first
  weight of the next one (its first LayerNorm's in the ViT, its self-attention query's in BERT). The same
  here, with n the tower's real depth (12 and 24 for ImageReward v1.0); f = 1 freezes both towers whole.
- Resize: ``transforms.Resize((224, 224))`` on a tensor is bilinear; antialiased since torchvision 0.17
  (their setup.py asks for >= 0.13.1, which did not antialias tensors): ours is antialiased.
- Dropout: theirs is active while the value network trains (MLP 0.2 / 0.2 / 0.1, BERT 0.1); ours stays in
  eval mode throughout, since the learner's values, regression and grad_x V must see one function.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from scoreaction.rewards.base import RewardError
from scoreaction.rewards.imagereward import (
    MAX_TEXT_LENGTH,
    ImageRewardModel,
    load_imagereward_model,
    load_imagereward_tokenizer,
)
from scoreaction.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
from scoreaction.value import blend

logger = logging.getLogger(__name__)

# (tower, layer prefix, the first parameter of a layer in the authors' module order)
_TOWERS = (
    ("vision", "encoder.layers", "layer_norm1.weight"),
    ("text", "encoder.layer", "attention.self.query.weight"),
)


def frozen_parameter_names(model: ImageRewardModel, fraction: float) -> set[str]:
    """Names (in ``model.named_parameters()``) ImageReward's fix_rate rule freezes at fix_rate = fraction:
    per tower, its embeddings, layers 0 .. k-1 and the first weight of layer k, k = int(depth * fraction);
    the whole tower when k = depth; nothing when fraction = 0. The MLP always trains."""
    if fraction <= 0:
        return set()
    names = set()
    for tower, prefix, first in _TOWERS:
        params = [n for n, _ in getattr(model, tower).named_parameters()]
        depth = 1 + max(int(m.group(1)) for n in params if (m := re.match(rf"{prefix}\.(\d+)\.", n)))
        k = int(depth * fraction)
        for n in params:
            m = re.match(rf"{prefix}\.(\d+)\.", n)
            if k >= depth or n.startswith("embeddings.") or (m and int(m.group(1)) < k):
                names.add(f"{tower}.{n}")
            elif n == f"{prefix}.{k}.{first}":
                names.add(f"{tower}.{n}")
    return names


class ImageRewardValue(nn.Module):
    """V(t, x, c) with F_phi = ImageReward_phi(decode(x), c): (B,).

    model: the ImageReward copy (fp32; its frozen part has requires_grad False); tokenizer: its BERT
    tokenizer; decode: latents (B, C, h, w) -> images (B, 3, H, W) in [0, 1], differentiable in the latents
    when they require grad (``DiffusionPolicy.decode``; not a submodule, so the policy's weights are not
    F_phi's); autocast: the compute-dtype context of the network's forward (the policy's on CUDA)."""

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer,
        decode: Callable[[Tensor], Tensor],
        *,
        frozen_fraction: float,
        use_reward_prior: bool,
        chunk_size: int,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.decode = decode
        self.autocast = autocast
        self.use_reward_prior = use_reward_prior
        self.chunk_size = chunk_size
        self.size = int(model.vision.config.image_size)
        frozen = frozen_parameter_names(model, frozen_fraction)
        for name, p in model.named_parameters():
            p.requires_grad_(f"{name}" not in frozen)
        self._tokens: dict[str, tuple[Tensor, Tensor]] = {}
        super().train(False)

    def train(self, mode: bool = True) -> ImageRewardValue:
        """Stays in eval mode (no dropout): V is one deterministic function for values, targets and grad_x."""
        return super().train(False)

    def tokens(self, prompts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
        """BLIP's BERT tokens of each prompt, padded to 35: input_ids, attention_mask (B, 35)."""
        for p in set(prompts) - self._tokens.keys():
            tok = self.tokenizer(
                [p], padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
            )
            self._tokens[p] = (tok["input_ids"], tok["attention_mask"])
        ids = torch.cat([self._tokens[p][0] for p in prompts]).to(device)
        mask = torch.cat([self._tokens[p][1] for p in prompts]).to(device)
        return ids, mask

    def pixels(self, x: Tensor) -> Tensor:
        """Latents (B, C, h, w) -> the network's pixels (B, 3, S, S): decode, bilinear resize, CLIP norm."""
        images = self.decode(x)
        if images.shape[-2:] != (self.size, self.size):
            images = F.interpolate(
                images, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        return normalize(images, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    def _learned_chunk(self, x: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        with self.autocast():
            return self.model(self.pixels(x), ids, mask).float()

    def learned(self, x: Tensor, prompts: Sequence[str]) -> Tensor:
        """F_phi(x, c): (B,), in chunks of chunk_size states; with gradients on and more than one chunk, each
        chunk's activations are recomputed in the backward pass (activation checkpointing)."""
        dev = next(self.model.parameters()).device
        ids, mask = self.tokens(prompts, dev)
        x = x.to(dev)
        n, c = x.shape[0], self.chunk_size
        recompute = torch.is_grad_enabled() and n > c
        out = []
        for i in range(0, n, c):
            args = (x[i : i + c], ids[i : i + c], mask[i : i + c])
            if recompute:
                out.append(checkpoint(self._learned_chunk, *args, use_reentrant=False))
            else:
                out.append(self._learned_chunk(*args))
        return torch.cat(out)

    def forward(
        self,
        t: Tensor,
        x: Tensor,
        prompt_embeds: Tensor,
        r_x0: Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Tensor:
        """V(t, x, c): (B,). t: (B,); x: latents (B, C, h, w); prompts: the B texts (ImageReward reads the
        text, not prompt_embeds); r_x0: (B,) reward of x0_hat, required when use_reward_prior."""
        if prompts is None or len(prompts) != x.shape[0]:
            raise ValueError(
                f"value.kind='imagereward' reads each state's prompt text: got "
                f"{'no prompts' if prompts is None else f'{len(prompts)} prompts'} for {x.shape[0]} states"
            )
        f = self.learned(x, list(prompts))
        return blend(t.to(f.device), f, r_x0) if self.use_reward_prior else f


def build_imagereward_value(cfg, policy) -> ImageRewardValue:
    """The imagereward F_phi of a run: ImageReward weights from value.weights (else
    reward.imagereward.weights), tokenizer reward.imagereward.tokenizer, on the policy's device in fp32."""
    if not hasattr(policy, "vae"):
        raise ValueError(
            f"value.kind='imagereward' needs an image model (it decodes the state); model.preset="
            f"{cfg.model.preset!r} has none: use an image preset (tiny, sd15, sd15-random, digits) or "
            "value.kind='conv'"
        )
    spec = cfg.value.weights or cfg.reward.imagereward.weights
    field = "value.weights" if cfg.value.weights else "reward.imagereward.weights"
    if spec is None:
        raise ValueError(
            "value.kind='imagereward' starts from the ImageReward weights: set value.weights or "
            "reward.imagereward.weights (ImageReward.safetensors and med_config.json)"
        )
    try:
        model = load_imagereward_model(spec).float().to(policy.device)
    except RewardError as exc:
        raise RewardError(str(exc).replace("reward.imagereward.weights", field)) from None
    tokenizer = load_imagereward_tokenizer(cfg.reward.imagereward.tokenizer)
    value = ImageRewardValue(
        model,
        tokenizer,
        policy.decode,
        frozen_fraction=cfg.value.frozen_fraction,
        use_reward_prior=cfg.value.use_reward_prior,
        chunk_size=cfg.value.chunk_size,
        autocast=getattr(policy, "_autocast", contextlib.nullcontext),
    )
    trainable = sum(p.numel() for p in value.parameters() if p.requires_grad)
    total = sum(p.numel() for p in value.parameters())
    logger.info(
        "value network imagereward from %s=%s: %d of %d parameters trainable (frozen_fraction %s)",
        field,
        spec,
        trainable,
        total,
        cfg.value.frozen_fraction,
    )
    return value
