"""Pretrain the `digits` model: SD1.5's component classes at small sizes on scikit-learn's handwritten digits.

    python jobs/pretrain.py [--seed 0] [--output-dir DIR] [--force] [--unet-steps N] [--evaluate 20]
                            [--export [FILE]] [--existing]

Without --output-dir it (re)builds the cached folder the `digits` preset loads
($SCOREACTION_CACHE/models/digits-v2-seed<seed>). The preset builds that folder by itself on first use,
from the weights shipped in scoreaction/models/weights/ (seed 0) or else by pretraining, so this script is
for rebuilding the shipped weights, other seeds or other step counts (then fine-tune it with
--set model.name_or_path=DIR). Writes a diffusers folder (safetensors) with loss.png (the loss curves) and
pretrain.json (settings, losses, seconds). --evaluate N samples N images per digit at the preset's sampler
settings and prints how often each classifier sees the prompted digit (overall and per digit), the
Frechet distance to real held-out digits and the diversity; they are also written to DIR/quality.json.
--export writes the folder as the shippable weights file (default: the package's file for this seed);
--existing evaluates or exports the folder at --output-dir without pretraining.

Rebuild the shipped weights (3 minutes on one idle core):

    python jobs/pretrain.py --output-dir /tmp/digits --force --evaluate 20 --export
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoreaction.models.digits import DIGITS_VERSION, PretrainSettings, pretrain_digits  # noqa: E402


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    d = PretrainSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seed", type=int, default=d.seed, help=f"seed of weights and data order (default {d.seed})"
    )
    p.add_argument("--output-dir", default=None, help="folder to write (default: the preset's cache folder)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder (once done)")
    p.add_argument("--vae-steps", type=_positive, default=d.vae_steps, help=f"default {d.vae_steps}")
    p.add_argument("--unet-steps", type=_positive, default=d.unet_steps, help=f"default {d.unet_steps}")
    p.add_argument("--text-steps", type=int, default=d.text_steps, help=f"default {d.text_steps}")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--subset", type=_positive, default=None, help="train on this many pretrain images only")
    p.add_argument(
        "--threads", type=_positive, default=d.threads, help=f"torch threads (default {d.threads})"
    )
    p.add_argument("--evaluate", type=int, default=0, metavar="N", help="then sample N images per digit")
    p.add_argument(
        "--export",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="write the shippable weights file (default FILE: the package's file for this seed)",
    )
    p.add_argument("--existing", action="store_true", help="use the folder at --output-dir, do not pretrain")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    from scoreaction.models.presets import default_cache_dir

    out = Path(args.output_dir or default_cache_dir() / "models" / f"digits-{DIGITS_VERSION}-seed{args.seed}")
    settings = PretrainSettings(
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch_size=args.batch_size,
        subset=args.subset,
        threads=args.threads,
        text_steps=args.text_steps,
    )
    if args.existing:
        if not (out / "model_index.json").is_file():
            print(
                f"error: --existing: {str(out)!r} holds no diffusers pipeline (model_index.json)",
                file=sys.stderr,
            )
            return 2
    else:
        try:
            result = pretrain_digits(out, settings, progress=not args.no_progress, overwrite=args.force)
        except FileExistsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _report(result, out)
    if args.evaluate > 0:
        _evaluate(out, args.evaluate)
    if args.export is not None:
        from scoreaction.models.digits_shipped import export_weights, shipped_weights_path

        path = export_weights(out, args.export or shipped_weights_path(args.seed))
        print(f"  exported {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _report(result, out: Path) -> None:
    print(
        f"pretrained in {result.seconds:.1f} s: VAE loss {result.vae_losses[0]:.4f} -> "
        f"{sum(result.vae_losses[-20:]) / len(result.vae_losses[-20:]):.4f}, UNet loss "
        f"{result.unet_losses[0]:.4f} -> {sum(result.unet_losses[-50:]) / len(result.unet_losses[-50:]):.4f}\n"
        f"  {out} (loss curve: {out / 'loss.png'})"
    )


def _evaluate(out: Path, per_digit: int) -> None:
    from scoreaction.config import preset
    from scoreaction.models.digits import torch_threads
    from scoreaction.models.presets import from_pretrained
    from scoreaction.rewards.digits import base_quality

    sampler = preset("digits")["sampler"]
    pipe = from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    with torch_threads(1):
        q = base_quality(
            pipe,
            per_digit=per_digit,
            num_steps=sampler["num_steps"],
            guidance_scale=sampler["guidance_scale"],
            eta=sampler["eta"],
        )
    q["sampler"] = sampler
    (out / "quality.json").write_text(json.dumps(q, indent=1))
    per = " ".join(f"{d}:{100 * a:.0f}%" for d, a in enumerate(q["accuracy_heldout_per_digit"]))
    print(
        f"  base model, {int(q['n'])} samples at the preset's sampler: prompted digit drawn "
        f"{100 * q['accuracy_heldout']:.0f}% (held-out classifier; per digit {per}), "
        f"{100 * q['accuracy_reward']:.0f}% (reward classifier); reward mean {q['reward_mean']:.3f}; "
        f"FID {q['fid']:.2f}; diversity {q['diversity']:.3f}"
    )


if __name__ == "__main__":
    sys.exit(main())
