"""Where a run's weights come from, and whether this machine has them: a check that loads nothing.

``jobs/finetune.py --dry-run`` prints it, so that a user with a config for SD1.5 and ImageReward learns,
before starting a cluster, where each set of weights must be put (a local folder named in the config, or
the Hugging Face cache of every node). Pure file-system and cache look-ups: no network, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scoreaction.config import DEFAULT_SD15_ID, Config


@dataclass
class WeightsStatus:
    what: str  # e.g. "model (model.name_or_path)"
    found: bool
    detail: str  # where it was found, or where to put it

    def line(self) -> str:
        return f"  {'found  ' if self.found else 'MISSING'} {self.what}: {self.detail}"


def _hub_cached(repo: str, filename: str, revision: str | None = None) -> str | None:
    """The cached local path of a hub file, or None (no network access)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers/transformers
        return None
    try:
        hit = try_to_load_from_cache(repo, filename, revision=revision)
    except Exception:  # an id that is not a valid repo name: treated as not cached
        return None
    return hit if isinstance(hit, str) else None


def _hub_cache_dir() -> str:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE

        return str(HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "the Hugging Face cache (HF_HOME)"


def model_status(cfg: Config) -> WeightsStatus:
    m = cfg.model
    if m.preset != "sd15":
        how = {
            "tiny": "written from its seeded configs on first use (no download)",
            "sd15-random": "random weights built from SD1.5's configs (no download)",
            "toy-gmm": "the toy's analytic score (no weights)",
        }.get(m.preset, "built by its preset")
        return WeightsStatus(f"model (model.preset={m.preset!r})", True, how)
    spec = m.name_or_path or DEFAULT_SD15_ID
    what = f"model (model.name_or_path={spec!r})"
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return WeightsStatus(what, True, f"local diffusers folder {str(path)!r}")
        return WeightsStatus(
            what,
            False,
            f"{str(path)!r} holds no model_index.json: give a diffusers folder (unet/, vae/, ...)",
        )
    cached = _hub_cached(spec, "model_index.json", m.revision)
    if cached:
        return WeightsStatus(what, True, f"in the Hugging Face cache ({Path(cached).parent})")
    return WeightsStatus(
        what,
        False,
        f"not a local folder and not in the Hugging Face cache ({_hub_cache_dir()}). Where there is network: "
        f"`huggingface-cli download {spec} --local-dir DIR` (safetensors weights), copy DIR to every node "
        "(or shared storage) and add --set model.name_or_path=DIR; or fill the cache (HF_HOME) on every node",
    )


def _reward_names(cfg: Config) -> list[str]:
    r = cfg.reward
    return list(r.weights) if r.weights else [r.name]


def reward_status(cfg: Config) -> list[WeightsStatus]:
    r = cfg.reward
    if r.service:
        return [
            WeightsStatus(
                f"reward ({', '.join(_reward_names(cfg))})",
                True,
                f"scored by reward.service={r.service!r}: its weights live with that service",
            )
        ]
    out = []
    for name in _reward_names(cfg):
        if name != "imagereward":
            if name in ("linear", "jpeg_compressibility", "jpeg_incompressibility"):
                out.append(WeightsStatus(f"reward {name!r}", True, "computed, no weights"))
            else:
                out.append(
                    WeightsStatus(
                        f"reward {name!r}",
                        True,
                        f"not checked here: resolved from reward.{name} when the reward workers start",
                    )
                )
            continue
        spec = r.imagereward.weights
        what = "reward 'imagereward' (reward.imagereward.weights)"
        convert = (
            "download ImageReward.pt and med_config.json from https://huggingface.co/THUDM/ImageReward, convert "
            "once with `python jobs/convert_reward_weights.py imagereward ImageReward.pt DIR`, put "
            "med_config.json in DIR, and add --set reward.imagereward.weights=DIR"
        )
        if spec is None:
            out.append(WeightsStatus(what, False, f"not set: {convert}"))
        else:
            p = Path(spec).expanduser()
            folder = p if p.is_dir() else p.parent
            weights = p if p.is_file() else p / "ImageReward.safetensors"
            if weights.is_file() and (folder / "med_config.json").is_file():
                out.append(WeightsStatus(what, True, f"{str(weights)!r} with med_config.json"))
            else:
                out.append(
                    WeightsStatus(
                        what,
                        False,
                        f"{spec!r} does not hold ImageReward.safetensors and med_config.json: {convert}",
                    )
                )
        tok = r.imagereward.tokenizer
        tok_found = (Path(tok).expanduser() / "vocab.txt").is_file() or _hub_cached(
            tok, "vocab.txt"
        ) is not None
        out.append(
            WeightsStatus(
                f"ImageReward's tokenizer (reward.imagereward.tokenizer={tok!r})",
                tok_found,
                "found"
                if tok_found
                else f"not cached: `huggingface-cli download {tok} vocab.txt tokenizer_config.json` where there "
                "is network (into the Hugging Face cache of every node), or set it to a folder with vocab.txt",
            )
        )
    return out


def weights_report(cfg: Config) -> tuple[str, bool]:
    """Text for --dry-run ("weights:" then one line per set of weights) and whether all were found."""
    rows = [model_status(cfg), *reward_status(cfg)]
    return "weights:\n" + "\n".join(r.line() for r in rows), all(r.found for r in rows)
