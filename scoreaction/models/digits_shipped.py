"""The pretrained ``digits`` weights shipped with the package, and how they are written and read.

Pretraining the default ``digits`` model takes about 3 minutes on one idle core and 8-9 minutes on a
loaded 2-core machine, too long for a first demo. So the package ships the result for seed 0 as one
safetensors file (``weights/digits-<version>-seed<seed>.safetensors``, about 5 MB, float32, written by
``jobs/pretrain.py --export``), and the cached diffusers folder is rebuilt from it in seconds:

- every UNet and VAE tensor;
- every text-encoder tensor except the 49,408-row token embedding, of which only the rows pretraining
  changed are stored (``text_encoder.token_rows.ids`` / ``.weight``); the other rows are the seeded random
  initialisation, rebuilt by ``build_untrained_pipeline(seed)``;
- in the metadata: the format version, the seed, the VAE scaling factor and the pretraining settings.

Other seeds, and a shipped file whose settings differ from the code's defaults, are pretrained instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_ROWS = "text_encoder.token_rows"
_EMBED_SUFFIX = "embeddings.token_embedding.weight"


def _embed_key(state: dict) -> str:
    """The token embedding's key (with or without "text_model.", as transformers versions name it)."""
    (key,) = [k for k in state if k.endswith(_EMBED_SUFFIX)]
    return key


def shipped_weights_path(seed: int) -> Path:
    from scoreaction.models.digits import DIGITS_VERSION

    return WEIGHTS_DIR / f"digits-{DIGITS_VERSION}-seed{seed}.safetensors"


def export_weights(directory: str | Path, path: str | Path) -> Path:
    """Write a pretrained digits folder (``pretrain_digits``'s output) as one shippable safetensors file."""
    from safetensors.torch import save_file

    from scoreaction.models.digits import DIGITS_VERSION, build_untrained_pipeline
    from scoreaction.models.presets import from_pretrained

    directory = Path(directory)
    meta_file = directory / "pretrain.json"
    if not meta_file.is_file():
        raise FileNotFoundError(
            f"{str(directory)!r} has no pretrain.json: not a folder written by pretrain_digits"
        )
    meta = json.loads(meta_file.read_text())
    seed = int(meta["settings"]["seed"])
    pipe = from_pretrained(str(directory))
    tensors: dict[str, torch.Tensor] = {}
    for name in ("unet", "vae"):
        for k, v in getattr(pipe, name).state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().float().contiguous()
    with tempfile.TemporaryDirectory() as tok_dir:
        init_state = build_untrained_pipeline(seed, tok_dir).text_encoder.state_dict()
    init = init_state[_embed_key(init_state)]
    state = pipe.text_encoder.state_dict()
    for k, v in state.items():
        if k == _embed_key(state):
            ids = torch.nonzero((v != init).any(dim=1)).flatten()
            tensors[f"{_ROWS}.ids"] = ids.to(torch.int64).contiguous()
            tensors[f"{_ROWS}.weight"] = v[ids].float().contiguous()
        else:
            tensors[f"text_encoder.{k.removeprefix('text_model.')}"] = v.detach().float().contiguous()
    metadata = {
        "format": "scoreaction-digits",
        "version": DIGITS_VERSION,
        "seed": str(seed),
        "vae_scaling_factor": repr(float(pipe.vae.config.scaling_factor)),
        "settings": json.dumps(meta["settings"], sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def matches_defaults(path: str | Path, seed: int) -> bool:
    """Whether the shipped file is the model ``PretrainSettings(seed=seed)`` would pretrain."""
    from scoreaction.models.digits import DIGITS_VERSION, PretrainSettings

    meta = read_metadata(path)
    expected = json.dumps(asdict(PretrainSettings(seed=seed)), sort_keys=True)
    return meta.get("version") == DIGITS_VERSION and meta.get("settings") == expected


def materialize(path: str | Path, directory: str | Path) -> Path:
    """Rebuild the diffusers folder of a shipped weights file into directory (atomically)."""
    from safetensors.torch import load_file

    from scoreaction.models.digits import build_untrained_pipeline

    meta = read_metadata(path)
    if meta.get("format") != "scoreaction-digits":
        raise ValueError(
            f"{str(path)!r} is not a digits weights file (metadata format={meta.get('format')!r})"
        )
    tensors = load_file(str(path))
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with tempfile.TemporaryDirectory() as tok_dir:
            pipe = build_untrained_pipeline(int(meta["seed"]), tok_dir)
            for name in ("unet", "vae", "text_encoder"):
                prefix = f"{name}."
                part = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
                module = getattr(pipe, name)
                if name == "text_encoder":
                    key = _embed_key(module.state_dict())
                    embed = module.state_dict()[key].clone()
                    embed[part.pop("token_rows.ids")] = part.pop("token_rows.weight")
                    part[key] = embed
                    # shipped keys carry no "text_model." (some transformers versions add it)
                    names = {k.removeprefix("text_model."): k for k in module.state_dict()}
                    part = {names.get(k, k): v for k, v in part.items()}
                module.load_state_dict(part, strict=True)
            pipe.vae.register_to_config(scaling_factor=float(meta["vae_scaling_factor"]))
            pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "shipped.json").write_text(
            json.dumps({"source": path.name if isinstance(path, Path) else str(path), **meta}, indent=1)
        )
        if directory.exists() and not (directory / "model_index.json").is_file():  # a broken cache
            shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
        try:
            os.rename(tmp, directory)
        except OSError:  # another process won the race; its folder is identical
            if not (directory / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("digits pipeline rebuilt from the shipped weights %s -> %s", path, directory)
    return directory
