"""The loss-curve figure of the ``digits`` pretraining (``loss.png`` beside the pretrained folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _smooth(values: list[float], k: int = 20) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < k:
        return v
    return np.convolve(v, np.ones(k) / k, mode="valid")


def write_loss_curve(
    vae_losses: list[float],
    unet_losses: list[float],
    path: str | Path,
    text_losses: list[float] | None = None,
) -> Path:
    """Loss curves of the pretraining stages (matplotlib, Agg), raw and a 20-step moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(vae_losses, "VAE (MSE + KL)")]
    if text_losses:
        stages.append((text_losses, "text encoder (prompt cos^2)"))
    stages.append((unet_losses, "UNet (eps MSE)"))
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4))
    for ax, (losses, title) in zip(axes, stages, strict=True):
        ax.plot(losses, color="0.75", lw=0.8, label="step")
        sm = _smooth(losses)
        ax.plot(np.arange(len(sm)) + (len(losses) - len(sm)), sm, color="C0", label="moving avg (20)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        if losses and min(losses) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("digits pretraining")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
