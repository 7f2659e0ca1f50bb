"""Image helpers: sample grids and PNG encoding."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """images: (B, 3, H, W) float in [0, 1] -> one PNG grid at path (written via a temp file)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, math.ceil(math.sqrt(images.shape[0])))
    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(grid, tmp)
    os.replace(tmp, path)
    return path
