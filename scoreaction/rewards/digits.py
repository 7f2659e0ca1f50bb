"""Rewards and measures of the ``digits`` preset: two digit classifiers, a Frechet distance, a diversity.

- ``digit_classifier``: log p(N | image) under a small CNN trained on the ``reward`` split of the digits
  (scoreaction.models.digits), N parsed from the prompt ``"a handwritten digit N"``: prompt alignment,
  the paper's learned reward in miniature. Scores are <= 0; 0 means certain of the prompted digit.
- ``digit_classifier_heldout``: the same architecture, another seed, trained on the disjoint ``monitor``
  split. As ``reward.monitor`` it shows over-optimisation of the first as a gap.
- ``digit_fid``: Frechet distance between samples and real held-out digits (the ``eval`` split) in the
  held-out classifier's 64-d feature space (the quality measure; ~0 for real digits).
- ``diversity``: mean pairwise RMS pixel distance of the samples of each prompt, averaged over prompts.

The classifiers train deterministically on first use (a few seconds on CPU) and are cached as
safetensors under the scoreaction cache (``$SCOREACTION_CACHE/rewards``).
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scoreaction.config.reward import RewardConfig
from scoreaction.rewards.base import ModelReward, RewardError, RewardOutput, check_images, resolve_device

logger = logging.getLogger(__name__)

CLASSIFIER_VERSION = "v1"
CLASSIFIER_SIZE = 16  # images are resized (area / bilinear) to this side, grey
# split the classifier learns from -> its training seed
CLASSIFIER_SPLITS: dict[str, int] = {"reward": 1, "monitor": 2}
_PROMPT_DIGIT = re.compile(r"\bdigit\s+([0-9])\b", re.IGNORECASE)


class DigitCNN(nn.Module):
    """Grey 16x16 -> 10 logits; ``features`` is the 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1, 16, 16) grey (channel mean), centred around 0."""
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-2:] != (CLASSIFIER_SIZE, CLASSIFIER_SIZE):
            down = x.shape[-1] > CLASSIFIER_SIZE
            x = F.interpolate(
                x,
                size=(CLASSIFIER_SIZE, CLASSIFIER_SIZE),
                mode="area" if down else "bilinear",
                **({} if down else {"align_corners": False}),
            )
        return x * 2 - 1

    def features(self, images: Tensor) -> Tensor:
        x = self.prepare(images)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        return self.fc2(self.features(images))


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Shifts of up to 1 px, contrast 0.7-1.1 and a little noise: robust to a generator's imperfections."""
    b = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    x = pad[..., dy : dy + x.shape[-2], dx : dx + x.shape[-1]]
    scale = 0.7 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    x = x * scale + 0.05 * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def train_digit_classifier(split: str, steps: int = 250, batch_size: int = 32) -> DigitCNN:
    """Train the CNN on one split of the digits, deterministically (seed of CLASSIFIER_SPLITS[split])."""
    from scoreaction.models.digits import digit_split, torch_threads

    if split not in CLASSIFIER_SPLITS:
        raise ValueError(f"split={split!r}: classifiers train on {', '.join(CLASSIFIER_SPLITS)}")
    seed = CLASSIFIER_SPLITS[split]
    images, labels = digit_split(split)
    # enable_grad: first use may come from inside a no_grad caller (classifier_features)
    with torch.random.fork_rng(devices=[]), torch_threads(1), torch.enable_grad():
        torch.manual_seed(seed)
        model = DigitCNN()
        gen = torch.Generator().manual_seed(seed + 1000)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        for _ in range(steps):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            loss = F.cross_entropy(model(_augment(images[idx], gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    return model


def classifier_path(split: str) -> Path:
    from scoreaction.models.presets import default_cache_dir

    return default_cache_dir() / "rewards" / f"digit-classifier-{CLASSIFIER_VERSION}-{split}.safetensors"


@lru_cache(maxsize=4)
def load_digit_classifier(split: str) -> DigitCNN:
    """The classifier of one split (reward or monitor), trained and cached on first use (CPU, eval mode)."""
    from safetensors.torch import load_file, save_file

    path = classifier_path(split)
    model = DigitCNN()
    if path.is_file():
        try:
            model.load_state_dict(load_file(path))
            return model.eval().requires_grad_(False)
        except Exception as exc:  # half-written or foreign file: retrain and replace it
            logger.warning("cached digit classifier %s is unreadable (%s); retraining it", path, exc)
    logger.info("training the digit classifier on the %s split (first use) -> %s", split, path)
    model = train_digit_classifier(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return model


def prompt_digits(prompts: list[str]) -> list[int]:
    """The digit each prompt names ("a handwritten digit N" -> N); RewardError for one naming none."""
    out = []
    for i, p in enumerate(prompts):
        m = _PROMPT_DIGIT.search(p) if isinstance(p, str) else None
        if m is None:
            raise RewardError(
                f"prompts[{i}]={p!r} names no digit: the digit classifier rewards score prompts of the form "
                "'a handwritten digit N' with N in 0..9"
            )
        out.append(int(m.group(1)))
    return out


class DigitClassifierReward(ModelReward):
    """log p(prompted digit | image) under the classifier of one split; info["correct"] = argmax matches."""

    def __init__(self, name: str, split: str, device: torch.device, batch_size: int = 256) -> None:
        super().__init__(device, torch.float32, batch_size)
        self.name = name
        self.model = load_digit_classifier(split).to(device)

    def forward(self, pixels: Tensor, prompts: list[str]) -> Tensor:
        labels = torch.tensor(prompt_digits(prompts), device=pixels.device)
        logp = F.log_softmax(self.model(pixels), dim=1)
        return logp.gather(1, labels[:, None]).squeeze(1)

    def _score(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        labels = torch.tensor(prompt_digits(prompts))  # every prompt checked before any work
        out = super()._score(images, prompts)
        with torch.no_grad():
            pred = self.predict(images.detach())
        out.info["correct"] = (pred == labels).float().to(images.device)
        return out

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Argmax digit of each image: (B,) int64 on CPU."""
        check_images(images)
        return (
            torch.cat(
                [
                    self.model(images[i : i + self.batch_size].to(self.device, torch.float32)).argmax(1).cpu()
                    for i in range(0, images.shape[0], self.batch_size)
                ]
            )
            if images.shape[0]
            else torch.zeros(0, dtype=torch.int64)
        )


def build_digit_classifier(cfg: RewardConfig) -> DigitClassifierReward:
    return DigitClassifierReward("digit_classifier", "reward", resolve_device(cfg.device), cfg.batch_size)


def build_digit_classifier_heldout(cfg: RewardConfig) -> DigitClassifierReward:
    return DigitClassifierReward(
        "digit_classifier_heldout", "monitor", resolve_device(cfg.device), cfg.batch_size
    )


# --------------------------------------------------------------------------------------------------
# Quality and diversity
# --------------------------------------------------------------------------------------------------


def frechet_distance(feats_a: np.ndarray | Tensor, feats_b: np.ndarray | Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets (n, d), n >= 2 each."""
    from scipy import linalg

    a = np.asarray(feats_a.detach().cpu() if isinstance(feats_a, Tensor) else feats_a, dtype=np.float64)
    b = np.asarray(feats_b.detach().cpu() if isinstance(feats_b, Tensor) else feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"feature sets must be (n>=2, d) with the same d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    # dead ReLU units make the covariances singular: a 1e-6 ridge keeps sqrtm stable (negligible bias)
    ridge = 1e-6 * np.eye(a.shape[1])
    s_a, s_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    covmean = np.real(linalg.sqrtm(s_a @ s_b))
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean)))


@torch.no_grad()
def classifier_features(images: Tensor, split: str = "monitor") -> Tensor:
    """64-d features of images (B, 3, H, W) in [0, 1] under the classifier of split (default held-out)."""
    check_images(images)
    model = load_digit_classifier(split)
    return torch.cat([model.features(images[i : i + 512].cpu().float()) for i in range(0, len(images), 512)])


def digit_fid(images: Tensor, reference: Tensor | None = None) -> float:
    """Frechet distance of images to real digits (default: the held-out ``eval`` split) in the held-out
    classifier's feature space. Lower is better; real digits against real digits give ~0."""
    if reference is None:
        from scoreaction.models.digits import digit_split

        reference, _ = digit_split("eval", size=images.shape[-1] if images.dim() == 4 else 16)
    return frechet_distance(classifier_features(images), classifier_features(reference))


def diversity(images: Tensor, prompts: list[str]) -> float:
    """Mean over prompts (with >= 2 images) of the mean pairwise RMS pixel distance of their images.
    0 when each prompt's images are identical; about 0.3-0.4 for different real digits of one class."""
    check_images(images, prompts)
    flat = images.detach().float().cpu().flatten(1)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    per_prompt = []
    for idx in groups.values():
        if len(idx) < 2:
            continue
        x = flat[idx]
        d = torch.cdist(x, x) / x.shape[1] ** 0.5
        n = len(idx)
        per_prompt.append(float(d.sum() / (n * (n - 1))))
    if not per_prompt:
        raise ValueError("diversity needs at least one prompt with two or more images")
    return float(np.mean(per_prompt))


# --------------------------------------------------------------------------------------------------
# The base model's quality (the pretraining's quality bar)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_digits(
    pipe, per_digit: int, seed: int = 0, num_steps: int = 20, guidance_scale: float = 2.0, eta: float = 1.0
) -> tuple[Tensor, list[str]]:
    """per_digit samples of each digit prompt from a diffusers pipeline: images (10 * per_digit, 3, H, W) in
    [0, 1] and their prompts (digit-major: all 0s first)."""
    from scoreaction.models.digits import IMAGE_SIZE, PROMPTS

    prompts = [p for p in PROMPTS for _ in range(per_digit)]
    gen = torch.Generator().manual_seed(seed)
    out = pipe(
        prompts,
        num_inference_steps=num_steps,
        guidance_scale=guidance_scale,
        eta=eta,
        generator=gen,
        output_type="pt",
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
    ).images
    return out.float().clamp(0, 1), prompts


def base_quality(
    pipe,
    per_digit: int = 20,
    seed: int = 1,
    num_steps: int = 20,
    guidance_scale: float = 2.0,
    eta: float = 1.0,
) -> dict:
    """How often a pipeline draws the prompted digit, by both classifiers, with the quality and diversity
    measures: {n, accuracy_heldout, accuracy_heldout_per_digit (list of 10), accuracy_reward, reward_mean,
    fid, diversity}."""
    images, prompts = sample_digits(pipe, per_digit, seed, num_steps, guidance_scale, eta)
    labels = torch.tensor(prompt_digits(prompts))
    out: dict = {"n": len(prompts)}
    for name, split in (("heldout", "monitor"), ("reward", "reward")):
        reward = DigitClassifierReward(f"digit_classifier_{name}", split, torch.device("cpu"))
        scored = reward.score(images, prompts)
        correct = scored.info["correct"].float().cpu()
        out[f"accuracy_{name}"] = float(correct.mean())
        if name == "heldout":
            out["accuracy_heldout_per_digit"] = [float(correct[labels == d].mean()) for d in range(10)]
        else:
            out["reward_mean"] = float(scored.scores.mean())
    out["fid"] = digit_fid(images)
    out["diversity"] = diversity(images, prompts)
    return out
