"""Convert a published reward checkpoint that is a pickle (.pt/.pth/.bin) to safetensors, once.

    python jobs/convert_reward_weights.py KIND IN_FILE_OR_DIR [OUT]

scoreaction's loaders read safetensors only and refuse pickles, because unpickling a file can run code.
Several reward checkpoints are published as pickles; run this once, on a file you trust (downloaded from
the authors' page), and point the config at the output. The file is read with
``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which accepts tensors and plain
containers only and fails on anything else.

KIND and what is written (keys are kept as published):

  aesthetic    sac+logos+ava1-l14-linearMSE.pth -> .safetensors   (keys layers.0/2/4/6/7.weight|bias)
  hpsv2        HPS_v2.1_compressed.pt           -> HPS_v2.1.safetensors   (its "state_dict" entry,
               a "module." prefix stripped)
  imagereward  ImageReward.pt                   -> DIR/ImageReward.safetensors (put med_config.json next to it)
  open_clip    open_clip_pytorch_model.bin      -> open_clip_model.safetensors
  transformers a folder with pytorch_model.bin  -> model.safetensors in the same (or OUT) folder,
               other files copied (e.g. PickScore_v1 if your copy has no safetensors)

OUT defaults to the input's folder with the standard name above.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import torch

KINDS = {
    "aesthetic": "sac+logos+ava1-l14-linearMSE.safetensors",
    "hpsv2": "HPS_v2.1.safetensors",
    "imagereward": "ImageReward.safetensors",
    "open_clip": "open_clip_model.safetensors",
    "transformers": "model.safetensors",
}


class ConversionError(ValueError):
    pass


def _state_dict(obj, src: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint: itself, or its 'state_dict' / 'model' entry."""
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                return _state_dict(obj[key], src)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(
            f"{src}: expected a dict of tensors (or one under 'state_dict' / 'model'), got "
            f"{type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'}"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def convert_file(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    """torch.load(src, weights_only=True) -> tensors -> dst (.safetensors); returns the tensors."""
    from safetensors.torch import save_file

    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler refused it, or it is not a torch file
        raise ConversionError(f"{src}: torch.load(weights_only=True) failed: {exc}") from None
    state = {k: v.detach().clone().contiguous() for k, v in _state_dict(obj, src).items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst), metadata={"converted_from": src.name})
    return state


def convert(kind: str, src: str | Path, out: str | Path | None = None) -> Path:
    """Convert src for a reward kind (see the module docstring); returns the written .safetensors path."""
    if kind not in KINDS:
        raise ConversionError(f"kind={kind!r} is unknown; allowed: {', '.join(KINDS)}")
    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src} does not exist")
    if kind == "transformers":
        if not src.is_dir():
            raise ConversionError(
                f"kind=transformers takes a folder holding pytorch_model.bin, got the file {src}"
            )
        out_dir = Path(out) if out else src
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix not in (".bin", ".pt", ".pth") and out_dir != src:
                shutil.copy2(f, out_dir / f.name)
        dst = out_dir / KINDS[kind]
        convert_file(src / "pytorch_model.bin", dst)
        return dst
    if src.is_dir():
        raise ConversionError(f"kind={kind} takes a file, got the folder {src}")
    if kind == "imagereward":
        dst = (
            Path(out) / KINDS[kind]
            if out and Path(out).suffix != ".safetensors"
            else Path(out or src.parent / KINDS[kind])
        )
    else:
        dst = Path(out) if out else src.parent / KINDS[kind]
    convert_file(src, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", help=f"one of: {', '.join(KINDS)}")
    p.add_argument(
        "src", help="the published checkpoint (a file you trust), or a folder for kind=transformers"
    )
    p.add_argument("out", nargs="?", default=None, help="output file (or folder); default next to the input")
    args = p.parse_args(argv)
    try:
        dst = convert(args.kind, args.src, args.out)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    digest = hashlib.sha256(dst.read_bytes()).hexdigest()[:16]
    print(f"wrote {dst} (sha256 {digest}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
