"""HPSv2 / HPSv2.1 (Human Preference Score): open_clip ViT-H-14 fine-tuned on human preferences.

As in ``hpsv2.img_score.score``: the model is open_clip ``ViT-H-14`` whose whole state dict is replaced by
the HPS checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``: ``{"state_dict": ...}`` with
open_clip's own key names); images go through HPSv2's validation transform (``light_augmentation=True``:
``ResizeMaxSize(224)`` bicubic of the longest edge, zero padding to a square, CLIP mean/std); the score is
the dot product of the L2-normalised image and text features (no logit scale), about 0.2-0.35.

Published as pickles: convert once (``jobs/convert_reward_weights.py hpsv2 HPS_v2.1_compressed.pt
HPS_v2.1.safetensors``), which keeps the ``state_dict`` entry with the same keys.
"""

from __future__ import annotations

from torch import Tensor

from scoreaction.rewards.base import ModelReward, resolve_device, resolve_dtype
from scoreaction.rewards.clip_models import OpenClip, load_open_clip

HPS_FILES = {"v2.0": "HPS_v2.safetensors", "v2.1": "HPS_v2.1.safetensors"}


class HPSReward(ModelReward):
    """hpsv2 = <E_img(x)/|E_img(x)|, E_txt(p)/|E_txt(p)|>: (B,)."""

    name = "hpsv2"

    def __init__(self, clip: OpenClip, device, dtype, batch_size: int) -> None:
        super().__init__(device, dtype, batch_size)
        self.clip = clip

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        x = self.clip.pixels(pixels, mode="longest_pad").to(self.dtype)
        img = self.clip.model.encode_image(x, normalize=True).float()
        txt = self.clip.model.encode_text(self.clip.tokens(prompts, self.device), normalize=True).float()
        return (img * txt).sum(-1)


def build_hps(cfg) -> HPSReward:
    dev = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, dev)
    o = cfg.hpsv2
    files = (HPS_FILES[o.version], "open_clip_model.safetensors")
    clip = load_open_clip(o.clip_model, None, o.weights, "hpsv2.weights", dev, dtype, "hpsv2", files)
    return HPSReward(clip, dev, dtype, cfg.batch_size)
