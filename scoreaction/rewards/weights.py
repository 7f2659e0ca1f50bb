"""Finding and reading reward-model weights: a local file or folder, or a hub id; safetensors only.

Several published reward checkpoints are pickles (the aesthetic MLP's .pth, HPSv2's .pt, ImageReward.pt).
They are never unpickled here: ``jobs/convert_reward_weights.py`` converts a file the user trusts once
(``torch.load(weights_only=True)``, the restricted unpickler), and these loaders read the result.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from torch import Tensor

from scoreaction.checkpoint import PICKLE_SUFFIXES, CheckpointError, refuse_pickle
from scoreaction.rewards.base import RewardError

logger = logging.getLogger(__name__)

CONVERT_HINT = "python jobs/convert_reward_weights.py {kind} IN_FILE OUT.safetensors"


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", ".", "~"))
        or spec.count("/") != 1
        or Path(spec).suffix.lower() in (*PICKLE_SUFFIXES, ".safetensors", ".json")
    )


def refuse_pickle_weights(path: Path, field: str, kind: str) -> None:
    try:
        refuse_pickle(path)
    except CheckpointError as exc:
        raise RewardError(
            f"reward.{field}={str(path)!r}: {exc} Convert a file you trust once with: "
            + CONVERT_HINT.format(kind=kind)
        ) from None


def resolve_file(
    spec: str | None, field: str, filenames: tuple[str, ...], kind: str, default_hub: str | None = None
) -> Path:
    """The local path of a weights (or config) file named by ``spec``.

    spec: a file, a folder holding one of ``filenames``, or a hub repo id ("org/name" or "hf-hub:org/name")
    from which the first of ``filenames`` that exists is fetched (cached; offline: from the cache only).
    ``field`` names the config field in errors; ``kind`` names the conversion command for pickles.
    """
    spec = spec or default_hub
    if not spec:
        raise RewardError(
            f"reward.{field} is not set: give the path of {' or '.join(filenames)} (a .safetensors file or "
            f"its folder). Published pickles convert once with: {CONVERT_HINT.format(kind=kind)}"
        )
    spec = spec.removeprefix("hf-hub:")
    path = Path(os.path.expanduser(spec))
    if path.exists():
        refuse_pickle_weights(path, field, kind)
        if path.is_file():
            return path
        for name in filenames:
            if (path / name).is_file():
                return path / name
        raise RewardError(
            f"reward.{field}={spec!r}: the folder holds none of {', '.join(filenames)}; put the weights there "
            f"(pickles convert once with: {CONVERT_HINT.format(kind=kind)})"
        )
    if _looks_like_path(spec):
        raise RewardError(f"reward.{field}={spec!r}: no such file or folder")
    return _hub_file(spec, field, filenames)


def _hub_file(repo: str, field: str, filenames: tuple[str, ...]) -> Path:
    from huggingface_hub import hf_hub_download

    reasons = []
    for name in filenames:
        try:
            return Path(hf_hub_download(repo, name))
        except Exception as exc:  # offline, missing file, missing repo: all end in the same advice
            reasons.append(f"{name}: {type(exc).__name__}")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    raise RewardError(
        f"reward.{field}={repo!r}: could not get {' or '.join(filenames)} from the Hugging Face hub "
        f"({'; '.join(reasons)}{', HF_HUB_OFFLINE is set' if offline else ''}). Download it from "
        f"https://huggingface.co/{repo} where there is network, then set reward.{field} to the local file "
        "or folder (or put it in the Hugging Face cache)."
    )


def load_safetensors(path: Path, field: str) -> dict[str, Tensor]:
    """All tensors of a .safetensors file; a clear error for anything else (corrupt, pickle, truncated)."""
    from safetensors.torch import load_file

    refuse_pickle_weights(path, field, "...")
    try:
        return load_file(str(path))
    except Exception as exc:
        raise RewardError(
            f"reward.{field}: {str(path)!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); "
            "re-download or re-convert it"
        ) from None


def check_keys(
    state: dict[str, Tensor], expected: set[str], field: str, path: Path, ignore: tuple = ()
) -> None:
    """Raise naming missing and unexpected keys (ignoring keys that start with any of ``ignore``)."""
    keys = {k for k in state if not k.startswith(tuple(ignore))}
    missing, extra = sorted(expected - keys), sorted(keys - expected)
    if missing or extra:
        raise RewardError(
            f"reward.{field}: {str(path)!r} does not have the expected key layout "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {extra[:4]}{'...' if len(extra) > 4 else ''}); is it the right model's weights?"
        )


def load_into(module, state: dict[str, Tensor], field: str, path: Path) -> None:
    """load_state_dict(strict) with key and shape errors turned into a RewardError naming the field."""
    check_keys(state, set(module.state_dict()), field, path)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RewardError(
            f"reward.{field}: {str(path)!r} has the right keys but wrong shapes for this architecture: "
            f"{str(exc).splitlines()[-1].strip()}"
        ) from None
