"""``preference``: a reward learned from stored human comparisons (Bradley-Terry), and how it is fitted.

The model scores an image x for a prompt p as

    f = normalize(phi(x))            phi: frozen image features, (B, F)
    g = psi(p)                       psi: hashed bag of words of the prompt, (B, P), L2-normalised
    r(x, p) = u . f + f^T W g        the trained head: u (F,), W (F, P)

and is fitted by Bradley-Terry on comparisons (a, b) of one prompt:

    P(a beats b) = sigmoid(r(a, p) - r(b, p))
    loss = BCE(sigmoid(r_a - r_b), y) + weight_decay * (|u|^2 + |W|^2),  y = 1 (a), 0 (b), 0.5 (tie)

Comparisons rated ``both_bad`` say nothing about which of the two is better and are left out. The bilinear
term lets the reward depend on the prompt (which digit, which object); the linear term carries what is
good whatever the prompt.

Frozen features (``features`` in preference.json):
- ``digits_cnn``: the 64-d penultimate layer of the ``digit_classifier_heldout`` CNN (digits-size images);
- ``clip``: open_clip image embeddings (SD-size images), loaded from safetensors as ``clip_score`` loads them
  (``clip_model``, ``clip_pretrained``, ``clip_weights``).

A fitted reward is a folder: ``preference_head.safetensors`` (u, W) and ``preference.json`` (features, sizes,
the held-out pairwise accuracy, the number of pairs). Set ``reward.name: preference`` and
``reward.preference.path: DIR`` (or ``reward.monitor: [preference]``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreaction.rewards.base import ModelReward, RewardError, resolve_device

logger = logging.getLogger(__name__)

HEAD_FILE = "preference_head.safetensors"
META_FILE = "preference.json"
PROMPT_DIM = 256
FEATURES = ("digits_cnn", "clip")
_WORD = re.compile(r"[a-z0-9]+")


def prompt_features(prompts: list[str], dim: int = PROMPT_DIM) -> Tensor:
    """Hashed bag of words and word pairs (md5 buckets, so stable across processes): (B, dim), L2-normalised."""
    out = torch.zeros(len(prompts), dim)
    for i, p in enumerate(prompts):
        words = _WORD.findall(p.lower())
        for tok in words + [f"{a}_{b}" for a, b in zip(words, words[1:], strict=False)]:
            out[i, int(hashlib.md5(tok.encode()).hexdigest()[:8], 16) % dim] += 1.0
    return F.normalize(out, dim=1)


class PreferenceHead(nn.Module):
    """r(f, g) = u . f + f^T W g on normalised image features f (B, F) and prompt features g (B, P)."""

    def __init__(self, feature_dim: int, prompt_dim: int = PROMPT_DIM) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.zeros(feature_dim))
        self.W = nn.Parameter(torch.zeros(feature_dim, prompt_dim))

    def forward(self, f: Tensor, g: Tensor) -> Tensor:
        f = F.normalize(f, dim=1)
        return f @ self.u + ((f @ self.W) * g).sum(1)


# --------------------------------------------------------------------------------------------------
# Frozen image features
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureSpec:
    """Which frozen features, and for clip where its weights come from."""

    kind: str = "digits_cnn"
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    clip_weights: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def feature_extractor(spec: FeatureSpec, device: torch.device) -> tuple[Callable[[Tensor], Tensor], int]:
    """(images (B, 3, H, W) in [0, 1] -> features (B, F), F). Gradients flow through it."""
    if spec.kind == "digits_cnn":
        from scoreaction.rewards.digits import load_digit_classifier

        cnn = load_digit_classifier("monitor").to(device)
        return cnn.features, cnn.fc1.out_features
    if spec.kind == "clip":
        from scoreaction.rewards.clip_models import load_open_clip

        clip = load_open_clip(
            spec.clip_model, spec.clip_pretrained, spec.clip_weights, "preference.clip_weights", device
        )
        clip.model.eval().requires_grad_(False)
        dim = int(clip.model.visual.output_dim)
        return (lambda x: clip.model.encode_image(clip.pixels(x))), dim
    raise RewardError(f"preference features={spec.kind!r} is unknown; allowed: {', '.join(FEATURES)}")


def default_features(image_side: int) -> str:
    """digits_cnn for digits-size images (side <= 64 px), clip for larger ones."""
    return "digits_cnn" if image_side <= 64 else "clip"


# --------------------------------------------------------------------------------------------------
# Fitting (pure torch on precomputed features)
# --------------------------------------------------------------------------------------------------

CHOICE_TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}  # both_bad: no preference between the two


@dataclass
class FitResult:
    head: PreferenceHead
    train_loss: list[float]
    heldout_accuracy: float  # on held-out pairs with a winner (ties left out); nan when there are none
    train_accuracy: float
    n_train: int
    n_heldout: int


def pairwise_accuracy(head: PreferenceHead, fa: Tensor, fb: Tensor, g: Tensor, y: Tensor) -> float:
    """Fraction of decided pairs (y != 0.5) whose winner gets the higher reward; nan when there are none."""
    decided = y != 0.5
    if not decided.any():
        return float("nan")
    with torch.no_grad():
        diff = head(fa[decided], g[decided]) - head(fb[decided], g[decided])
    return float(((diff > 0).float() == y[decided]).float().mean())


def fit_bradley_terry(
    fa: Tensor,
    fb: Tensor,
    g: Tensor,
    y: Tensor,
    heldout: Tensor,
    steps: int = 500,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Fit u, W on features fa, fb (N, F) of the two images, prompt features g (N, P), targets y (N,) in
    {1, 0, 0.5}; heldout (N,) bool marks the pairs kept out of training. Full-batch Adam."""
    torch.manual_seed(seed)
    head = PreferenceHead(fa.shape[1], g.shape[1])
    train = ~heldout
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    with torch.enable_grad():
        for step in range(steps):
            logits = head(fa[train], g[train]) - head(fb[train], g[train])
            loss = F.binary_cross_entropy_with_logits(logits, y[train])
            loss = loss + weight_decay * (head.u.square().sum() + head.W.square().sum())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step, losses[-1])
    head.eval().requires_grad_(False)
    return FitResult(
        head=head,
        train_loss=losses,
        heldout_accuracy=pairwise_accuracy(head, fa[heldout], fb[heldout], g[heldout], y[heldout]),
        train_accuracy=pairwise_accuracy(head, fa[train], fb[train], g[train], y[train]),
        n_train=int(train.sum()),
        n_heldout=int(heldout.sum()),
    )


def save_preference_reward(
    directory: str | Path, head: PreferenceHead, spec: FeatureSpec, info: dict
) -> Path:
    """Write DIR/preference_head.safetensors and DIR/preference.json (features, dims and info)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(d / HEAD_FILE))
    meta = {
        "features": spec.to_json(),
        "feature_dim": head.u.shape[0],
        "prompt_dim": head.W.shape[1],
        **info,
    }
    (d / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return d


# --------------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------------


class PreferenceReward(ModelReward):
    """r(x, p) of a fitted folder; differentiable in the images."""

    name = "preference"

    def __init__(self, directory: str | Path, device: torch.device, batch_size: int = 64) -> None:
        from safetensors.torch import load_file

        super().__init__(device, torch.float32, batch_size)
        d = Path(directory)
        if not (d / HEAD_FILE).is_file() or not (d / META_FILE).is_file():
            raise RewardError(
                f"reward.preference.path={str(directory)!r} holds no fitted preference reward ({HEAD_FILE} and "
                f"{META_FILE}): fit one with python jobs/train_reward.py --preferences URL --output DIR"
            )
        self.meta = json.loads((d / META_FILE).read_text())
        self.spec = FeatureSpec(**self.meta["features"])
        self.head = PreferenceHead(int(self.meta["feature_dim"]), int(self.meta["prompt_dim"]))
        self.head.load_state_dict(load_file(str(d / HEAD_FILE)))
        self.head.to(device).eval().requires_grad_(False)
        self.features, dim = feature_extractor(self.spec, device)
        if dim != self.head.u.shape[0]:
            raise RewardError(
                f"reward.preference.path={str(directory)!r}: the head takes {self.head.u.shape[0]}-d features "
                f"but {self.spec.kind} gives {dim}-d"
            )

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        g = prompt_features(prompts, self.head.W.shape[1]).to(pixels.device)
        return self.head(self.features(pixels).float(), g)


def build_preference(cfg) -> PreferenceReward:
    """reward.preference.path -> the fitted reward (RewardError when unset or empty)."""
    path = cfg.preference.path
    if not path:
        raise RewardError(
            "reward.name=preference needs reward.preference.path: the folder jobs/train_reward.py wrote"
        )
    return PreferenceReward(path, resolve_device(cfg.device), cfg.batch_size)
