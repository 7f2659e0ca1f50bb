"""The LAION aesthetic predictor v2 (improved-aesthetic-predictor): an MLP on CLIP ViT-L/14 image embeddings.

As in its ``simple_inference.py`` (and DDPO's aesthetic scorer): the image goes through OpenAI CLIP
ViT-L/14's preprocessing (bicubic resize of the shortest edge to 224, centre crop, CLIP mean/std), its image
embedding is L2-normalised, and the MLP maps it to a score (about 1-10, higher = more aesthetic).

The MLP's published key layout (``sac+logos+ava1-l14-linearMSE.pth``), fixed here and in the tests:

    layers.0: Linear(768, 1024)   layers.1: Dropout(0.2)
    layers.2: Linear(1024, 128)   layers.3: Dropout(0.2)
    layers.4: Linear(128, 64)     layers.5: Dropout(0.1)
    layers.6: Linear(64, 16)
    layers.7: Linear(16, 1)       (no activations between the layers: the published model is linear)

The widths are read from the weight shapes, so a tiny model with the same keys loads through the same code.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from scoreaction.rewards.base import ModelReward, RewardError, resolve_device, resolve_dtype
from scoreaction.rewards.clip_models import OpenClip, load_open_clip
from scoreaction.rewards.weights import check_keys, load_into, load_safetensors, resolve_file

logger = logging.getLogger(__name__)

MLP_LINEAR_LAYERS = (0, 2, 4, 6, 7)
MLP_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}
MLP_FILES = ("sac+logos+ava1-l14-linearMSE.safetensors", "aesthetic_mlp.safetensors", "model.safetensors")
MLP_KEYS = {f"layers.{i}.{p}" for i in MLP_LINEAR_LAYERS for p in ("weight", "bias")}


class AestheticMLP(nn.Module):
    """The published MLP; widths: (in, h0, h1, h2, h3) -> 1, e.g. (768, 1024, 128, 64, 16)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.widths = tuple(widths)
        if len(widths) != 5:
            raise ValueError(f"widths must be 5 numbers (input and four hidden widths), got {widths}")
        mods: list[nn.Module] = []
        dims = [*widths, 1]
        li = 0
        for i in range(8):
            if i in MLP_DROPOUT:
                mods.append(nn.Dropout(MLP_DROPOUT[i]))
            else:
                mods.append(nn.Linear(dims[li], dims[li + 1]))
                li += 1
        self.layers = nn.Sequential(*mods)

    def forward(self, emb: Tensor) -> Tensor:
        """emb: (B, in) L2-normalised -> (B, 1)."""
        return self.layers(emb)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> AestheticMLP:
        widths = (
            state["layers.0.weight"].shape[1],
            *(state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6)),
        )
        return cls(tuple(int(w) for w in widths))


def load_aesthetic_mlp(spec: str | None, field: str = "aesthetic.mlp_weights") -> AestheticMLP:
    path = resolve_file(spec, field, MLP_FILES, "aesthetic")
    state = load_safetensors(path, field)
    check_keys(state, MLP_KEYS, field, path)
    mlp = AestheticMLP.from_state_dict(state)
    load_into(mlp, state, field, path)
    return mlp.eval().requires_grad_(False)


class AestheticReward(ModelReward):
    """aesthetic = MLP(E_img(x) / ||E_img(x)||): (B,). info: none."""

    name = "aesthetic"

    def __init__(self, clip: OpenClip, mlp: AestheticMLP, device, dtype, batch_size: int) -> None:
        super().__init__(device, dtype, batch_size)
        embed_dim = clip.model.text_projection.shape[1]
        in_dim = mlp.layers[0].in_features
        if in_dim != embed_dim:
            raise RewardError(
                f"reward.aesthetic.mlp_weights takes {in_dim}-d embeddings but the CLIP model "
                f"(reward.aesthetic.clip_model) gives {embed_dim}-d ones; the published MLP needs ViT-L-14"
            )
        self.clip, self.mlp = clip, mlp.to(device)

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        emb = self.clip.model.encode_image(self.clip.pixels(pixels).to(self.dtype)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.mlp(emb).squeeze(-1)


def build_aesthetic(cfg) -> AestheticReward:
    dev = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, dev)
    o = cfg.aesthetic
    mlp = load_aesthetic_mlp(o.mlp_weights)
    clip = load_open_clip(
        o.clip_model, o.clip_pretrained, o.clip_weights, "aesthetic.clip_weights", dev, dtype
    )
    return AestheticReward(clip, mlp, dev, dtype, cfg.batch_size)
