"""Fit the ``preference`` reward on the comparisons the playground stored (Bradley-Terry, a small head on frozen
image features; scoreaction/rewards/preference.py has the model and the loss).

    python jobs/train_reward.py --preferences sqlite:///outputs/feedback.db --output outputs/preference-reward
    # then: python jobs/finetune.py --preset digits reward.name=preference \\
    #           reward.preference.path=outputs/preference-reward

Prints and saves (DIR/preference.json, DIR/metrics.json) the pairwise accuracy on a held-out split of the
comparisons (pairs with a winner; ties train but are not scored, both_bad pairs are left out). Weights are
safetensors only. No Ray: it runs on one machine.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoreaction.rewards.base import resolve_device  # noqa: E402
from scoreaction.rewards.preference import (  # noqa: E402
    CHOICE_TARGET,
    FEATURES,
    FeatureSpec,
    default_features,
    feature_extractor,
    fit_bradley_terry,
    prompt_features,
    save_preference_reward,
)
from scoreaction.serving.feedback_store import FeedbackStore, safe_url  # noqa: E402

logger = logging.getLogger("train_reward")


def png_tensor(png: bytes) -> torch.Tensor:
    """PNG bytes -> (3, H, W) float in [0, 1]."""
    with Image.open(io.BytesIO(png)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def image_features(pngs: list[bytes], extract, device: torch.device, batch: int = 64) -> torch.Tensor:
    """Features (N, F) of every PNG, in order (images of one size batched together)."""
    images = [png_tensor(p) for p in pngs]
    out: list[torch.Tensor | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(i)
    with tqdm(total=len(images), desc="features", unit="img") as bar:
        for idx in by_shape.values():
            for s in range(0, len(idx), batch):
                chunk = idx[s : s + batch]
                feats = extract(torch.stack([images[i] for i in chunk]).to(device)).float().cpu()
                for i, f in zip(chunk, feats, strict=True):
                    out[i] = f
                bar.update(len(chunk))
    return torch.stack(out)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preferences", required=True, help="database URL (feedback.database_url of the service)")
    p.add_argument("--output", required=True, help="folder for preference_head.safetensors + preference.json")
    p.add_argument("--features", default="auto", choices=("auto", *FEATURES), help="frozen image features")
    p.add_argument("--clip-model", default="ViT-L-14")
    p.add_argument("--clip-pretrained", default="openai")
    p.add_argument("--clip-weights", default=None, help="open_clip safetensors file, folder or hub id")
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of comparisons held out (0..0.9)")
    p.add_argument("--steps", type=int, default=500, help="full-batch Adam steps")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--weight-decay",
        type=float,
        default=1e-4,
        help="L2 on u and W (1e-3 underfits: train accuracy 0.96 on clean digit pairs)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split and the head's init")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0.0 <= args.heldout <= 0.9:
        p.error(f"--heldout={args.heldout} must lie in [0, 0.9]")

    store = FeedbackStore(args.preferences)
    rows = [r for r in store.iter_all() if r["choice"] in CHOICE_TARGET]
    total = store.count()
    store.close()
    if len(rows) < 2:
        p.error(
            f"{safe_url(store.url)} holds {len(rows)} comparisons with a preference (of {total}); rate more"
        )
    kind = (
        args.features
        if args.features != "auto"
        else default_features(max(rows[0]["height"], rows[0]["width"]))
    )
    spec = FeatureSpec(kind, args.clip_model, args.clip_pretrained, args.clip_weights)
    device = resolve_device(args.device)
    extract, _ = feature_extractor(spec, device)
    print(
        f"{len(rows)} comparisons with a preference ({total - len(rows)} both_bad left out); features {kind}"
    )

    feats = image_features([r["image_a"] for r in rows] + [r["image_b"] for r in rows], extract, device)
    fa, fb = feats[: len(rows)], feats[len(rows) :]
    g = prompt_features([r["prompt"] for r in rows])
    y = torch.tensor([CHOICE_TARGET[r["choice"]] for r in rows])
    gen = torch.Generator().manual_seed(args.seed)
    n_held = int(round(args.heldout * len(rows)))
    heldout = torch.zeros(len(rows), dtype=torch.bool)
    heldout[torch.randperm(len(rows), generator=gen)[:n_held]] = True

    t0 = time.perf_counter()
    with tqdm(total=args.steps, desc="bradley-terry", unit="step") as bar:

        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4f}")

        fit = fit_bradley_terry(
            fa, fb, g, y, heldout, args.steps, args.lr, args.weight_decay, args.seed, progress=progress
        )
    metrics = {
        "heldout_pairwise_accuracy": fit.heldout_accuracy,
        "train_pairwise_accuracy": fit.train_accuracy,
        "n_train": fit.n_train,
        "n_heldout": fit.n_heldout,
        "n_heldout_decided": int((y[heldout] != 0.5).sum()),
        "final_train_loss": fit.train_loss[-1],
        "fit_seconds": time.perf_counter() - t0,
        "comparison_ids": [int(rows[0]["id"]), int(rows[-1]["id"])],
        "database": safe_url(args.preferences),
    }
    out = save_preference_reward(args.output, fit.head, spec, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    acc = fit.heldout_accuracy
    shown = "n/a (no held-out pair with a winner)" if math.isnan(acc) else f"{acc:.3f}"
    print(
        f"held-out pairwise accuracy {shown} on {metrics['n_heldout_decided']} pairs "
        f"(train {fit.train_accuracy:.3f} on {fit.n_train}); wrote {out}"
    )
    return metrics


if __name__ == "__main__":
    main()
