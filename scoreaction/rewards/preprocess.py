"""Image preprocessing of the CLIP-family reward models, on tensors (so gradients can flow).

The authors' pipelines start from PIL (uint8) images; ours start from (B, 3, H, W) float tensors in [0, 1].
Without gradients (the usual call) the images are first rounded to uint8 levels, as saving them as PIL
images would, and then:

- CLIP / open_clip / PickScore / ImageReward / the aesthetic predictor: exactly the authors' transform on
  PIL images: ``Resize(size, BICUBIC)`` of the shortest edge, ``CenterCrop(size)``, ``ToTensor``,
  ``Normalize(mean, std)``.
- HPSv2 (its open_clip fork, ``light_augmentation=True``): ``ToTensor`` first, then ``ResizeMaxSize``
  (longest edge to size, bicubic on the float tensor, no clamp), zero padding to a square, ``Normalize``:
  the same tensor computation as theirs.

With gradients (``images.requires_grad``: the value-gradient estimator) nothing is rounded and the PIL
resize is replaced by torchvision's differentiable antialiased bicubic resize of the float tensor plus a
clamp to [0, 1]: within 1.5/255 of PIL's on smooth images (a few levels on pixel noise, since PIL works in
fixed point on uint8).
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel. x: (B, 3, H, W)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def quantize(x: Tensor) -> Tensor:
    """Round to uint8 levels, as converting to a PIL image does: round(x * 255) / 255."""
    return (x.clamp(0, 1) * 255).round() / 255


def pil_resize_center_crop(x: Tensor, size: int) -> Tensor:
    """The authors' PIL path, per image: uint8 PIL image -> Resize(size, BICUBIC) -> CenterCrop -> ToTensor."""
    from PIL import Image
    from torchvision.transforms import functional as F

    arr = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        img = F.resize(Image.fromarray(a), size, interpolation=InterpolationMode.BICUBIC)
        out.append(F.to_tensor(F.center_crop(img, [size, size])))
    return torch.stack(out).to(x.device)


def resize_shortest_center_crop(x: Tensor, size: int, clamp: bool = True) -> Tensor:
    """Bicubic (antialiased) resize of the shortest edge to size, then a centre crop: (B, 3, size, size)."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        # torchvision's Resize(int) rule: shortest edge -> size, the other edge int(size * long / short)
        if h <= w:
            new = (size, int(size * w / h))
        else:
            new = (int(size * h / w), size)
        x = TF.resize(x, list(new), interpolation=InterpolationMode.BICUBIC, antialias=True)
        if clamp:
            x = x.clamp(0, 1)
    return TF.center_crop(x, [size, size])


def resize_max_pad(x: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """HPSv2's ResizeMaxSize: longest edge -> size (bicubic), pad the rest with fill: (B, 3, size, size)."""
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale != 1.0:
        new_h, new_w = round(h * scale), round(w * scale)
        x = TF.resize(x, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = size - new_h, size - new_w
        x = torch.nn.functional.pad(
            x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill
        )
    return x


def clip_preprocess(
    x: Tensor,
    size: int,
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
    std: tuple[float, ...] = OPENAI_CLIP_STD,
    mode: str = "shortest",
) -> Tensor:
    """images (B, 3, H, W) in [0, 1] -> model pixels (B, 3, size, size), normalised.

    mode: "shortest" (resize shortest edge + centre crop, the CLIP default) or "longest_pad" (HPSv2).
    Exact PIL path unless x requires grad (see the module docstring).
    """
    exact = not x.requires_grad
    if mode == "longest_pad":
        x = resize_max_pad(quantize(x) if exact else x, size)
    elif mode == "shortest":
        x = pil_resize_center_crop(x, size) if exact else resize_shortest_center_crop(x, size)
    else:
        raise ValueError(f"preprocess mode={mode!r}; allowed: shortest, longest_pad")
    return normalize(x, mean, std)
