"""The ``preference`` reward: Bradley-Terry on stored comparisons (jobs/train_reward.py), the reward it
writes (reward.name / reward.monitor = preference), and (slow) the whole loop on ``digits``: a scripted rater
through the HTTP API -> a fitted reward -> a short fine-tune against it -> the rater's criterion improves."""

from __future__ import annotations

import base64
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from scoreaction.config import RewardConfig
from scoreaction.rewards import RewardError, build_monitors, build_reward
from scoreaction.rewards.preference import (
    HEAD_FILE,
    PreferenceHead,
    fit_bradley_terry,
    pairwise_accuracy,
    prompt_features,
)
from scoreaction.serving.feedback_store import FeedbackStore
from scoreaction.serving.generate import encode_png, images_to_uint8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))
sys.path.insert(0, str(ROOT))
import train_reward  # noqa: E402


def test_bradley_terry_on_hand_made_features():
    """Two images per pair; the winner has the larger normalised feature 0 (the head normalises f): BT must
    rank held-out pairs by it."""
    gen = torch.Generator().manual_seed(0)
    n = 200
    fa, fb = torch.randn(n, 4, generator=gen), torch.randn(n, 4, generator=gen)
    g = prompt_features(["same prompt"] * n)
    unit_a, unit_b = torch.nn.functional.normalize(fa, dim=1), torch.nn.functional.normalize(fb, dim=1)
    y = (unit_a[:, 0] > unit_b[:, 0]).float()  # a wins when its normalised feature 0 is larger
    heldout = torch.arange(n) >= 150
    fit = fit_bradley_terry(fa, fb, g, y, heldout, steps=300)
    assert fit.heldout_accuracy > 0.9 and fit.n_train == 150 and fit.n_heldout == 50
    assert fit.train_loss[-1] < fit.train_loss[0] - 0.1  # from log 2 = 0.693 at zero weights
    # ties are not scored; a head at zero scores every decided pair as wrong (diff 0 is not > 0 for y = 1)
    zero = PreferenceHead(4, g.shape[1])
    assert math.isnan(pairwise_accuracy(zero, fa[:3], fb[:3], g[:3], torch.full((3,), 0.5)))
    assert pairwise_accuracy(zero, fa[:4], fb[:4], g[:4], torch.ones(4)) == 0.0


def test_prompt_features_tell_the_digits_apart():
    g = prompt_features([f"a handwritten digit {d}" for d in range(10)])
    sims = g @ g.T
    assert torch.allclose(sims.diagonal(), torch.ones(10))
    assert (sims - torch.eye(10)).max() < 0.9  # each digit word changes the vector


def _png(image: torch.Tensor) -> bytes:
    return encode_png(images_to_uint8(image[None])[0])


@pytest.fixture(scope="module")
def digit_pairs_db(tmp_path_factory):
    """200 comparisons of real held-out digits: for 'a handwritten digit d', an image of d beats one of
    another digit (10% ties, 5% both_bad)."""
    from scoreaction.models.digits import digit_split

    images, labels = digit_split("eval")
    rng = random.Random(0)
    url = f"sqlite:///{tmp_path_factory.mktemp('db')}/fb.db"
    store = FeedbackStore(url)
    by_digit = {d: [i for i in range(len(labels)) if labels[i] == d] for d in range(10)}
    for k in range(200):
        d = rng.randrange(10)
        other = rng.choice([e for e in range(10) if e != d])
        good, bad = rng.choice(by_digit[d]), rng.choice(by_digit[other])
        a_good = rng.random() < 0.5
        ia, ib = (good, bad) if a_good else (bad, good)
        roll = rng.random()
        choice = "tie" if roll < 0.1 else "both_bad" if roll < 0.15 else ("a" if a_good else "b")
        store.add(
            prompt=f"a handwritten digit {d}",
            model_a="base",
            model_b="base",
            checkpoint_a="base",
            checkpoint_b="base",
            seed_a=k,
            seed_b=k + 1000,
            image_a=_png(images[ia]),
            image_b=_png(images[ib]),
            choice=choice,
            height=16,
            width=16,
            num_inference_steps=20,
            guidance_scale=2.0,
            eta=1.0,
        )
    store.close()
    return url


def test_train_reward_fits_saves_and_scores(digit_pairs_db, tmp_path, capsys):
    out = tmp_path / "reward"
    metrics = train_reward.main(["--preferences", digit_pairs_db, "--output", str(out), "--steps", "300"])
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed and "features digits_cnn" in printed
    assert metrics["heldout_pairwise_accuracy"] > 0.85, metrics  # chance: 0.5
    assert metrics["n_train"] + metrics["n_heldout"] == len(
        FeedbackStore(digit_pairs_db).page(limit=1000)
    ) - sum(r["choice"] == "both_bad" for r in FeedbackStore(digit_pairs_db).page(limit=1000))
    saved = json.loads((out / "preference.json").read_text())
    assert saved["heldout_pairwise_accuracy"] == metrics["heldout_pairwise_accuracy"]
    assert sorted(p.name for p in out.iterdir()) == sorted([HEAD_FILE, "preference.json", "metrics.json"])

    # reward.name=preference: real digits of the prompted class score higher than the others
    from scoreaction.models.digits import digit_split

    cfg = RewardConfig(name="preference", preference={"path": str(out)}, device="cpu")
    reward = build_reward(cfg)
    images, labels = digit_split("eval")
    prompts = [f"a handwritten digit {int(d)}" for d in labels]
    right = reward(images, prompts)
    wrong = reward(images, [f"a handwritten digit {(int(d) + 1) % 10}" for d in labels])
    assert (right > wrong).float().mean() > 0.85
    x = images[:4].clone().requires_grad_(True)  # differentiable in the images (value gradient)
    reward(x, prompts[:4]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # and as a monitor
    assert set(build_monitors(RewardConfig(monitor=["preference"], preference={"path": str(out)}))) == {
        "preference"
    }


def test_preference_reward_errors_name_the_field(tmp_path):
    with pytest.raises(RewardError, match="reward.preference.path"):
        build_reward(RewardConfig(name="preference"))
    with pytest.raises(RewardError, match="holds no fitted preference reward"):
        build_reward(RewardConfig(name="preference", preference={"path": str(tmp_path)}))


# --------------------------------------------------------------------------------------------------
# The whole loop on digits (slow)
# --------------------------------------------------------------------------------------------------

E2E_PAIRS = 240
GEN = {"num_inference_steps": 20, "guidance_scale": 2.0, "eta": 1.0}


def _rater_scores(client: TestClient, model: str, seeds: list[int], digits: list[int], rater) -> torch.Tensor:
    """log p(prompted digit) under the rater's classifier of each image the service draws."""
    from train_reward import png_tensor

    imgs = []
    for s, d in zip(seeds, digits, strict=True):
        r = client.post(
            "/v1/generate", json={"prompt": f"a handwritten digit {d}", "model": model, "seed": s, **GEN}
        )
        assert r.status_code == 200, r.text
        imgs.append(png_tensor(base64.b64decode(r.json()["images"][0]["b64_png"])))
    return rater(torch.stack(imgs), [f"a handwritten digit {d}" for d in digits])


@pytest.mark.slow
def test_the_loop_on_digits_improves_the_raters_criterion(tmp_path):
    """Scripted rater: prefers the image the digit_classifier (reward split) gives the higher log p(prompted
    digit). The reward is fitted on the held-out classifier's features, so it never sees the rater's model."""
    from scoreaction.config import ModelConfig, build_config
    from scoreaction.rewards import build_named
    from scoreaction.serving.generate import ImageGenerator
    from scoreaction.trainer import Trainer
    from serve.feedback_local import build_local_app
    from serve.settings import ServeSettings

    torch.set_num_threads(1)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    db = f"sqlite:///{tmp_path}/feedback.db"
    settings = ServeSettings.model_validate(
        {"checkpoint_root": str(outputs), "feedback": {"database_url": db}}
    )
    generator = ImageGenerator.from_config(ModelConfig(preset="digits", device="cpu"), chunk=1)
    app, _ = build_local_app(generator, settings, root=tmp_path)
    client = TestClient(app, raise_server_exceptions=False)
    rater = build_named("digit_classifier", RewardConfig(device="cpu"))

    # 1. rate: pairs of the base model on two seeds, through the HTTP API
    rng = random.Random(0)
    for k in range(E2E_PAIRS):
        d = rng.randrange(10)
        prompt = f"a handwritten digit {d}"
        sides = {}
        for side, seed in (("a", 2 * k), ("b", 2 * k + 1)):
            r = client.post("/v1/generate", json={"prompt": prompt, "model": "base", "seed": seed, **GEN})
            from train_reward import png_tensor

            sides[side] = (seed, png_tensor(base64.b64decode(r.json()["images"][0]["b64_png"])))
        score = rater(torch.stack([sides["a"][1], sides["b"][1]]), [prompt, prompt])
        choice = "a" if score[0] > score[1] else "b"
        body = {"prompt": prompt, "a": {"model": "base", "seed": sides["a"][0]}, **GEN, "choice": choice}
        body["b"] = {"model": "base", "seed": sides["b"][0]}
        assert client.post("/v1/preferences", json=body).status_code == 201
    # 2. fit the reward
    reward_dir = tmp_path / "preference-reward"
    metrics = train_reward.main(["--preferences", db, "--output", str(reward_dir)])
    print(
        "E2E reward",
        json.dumps({k: metrics[k] for k in ("heldout_pairwise_accuracy", "n_train", "n_heldout")}),
    )
    assert metrics["heldout_pairwise_accuracy"] > 0.65, metrics  # chance: 0.5
    # 3. fine-tune against it (in-process), the rater's classifier as a monitor
    cfg = build_config(
        "digits",
        overrides=[
            "reward.name=preference",
            f"reward.preference.path={reward_dir}",
            "reward.monitor=[digit_classifier]",
            "run.epochs=4",
            f"run.output_dir={outputs / 'pref'}",
        ],
    )
    summary = Trainer(cfg).fit()
    print("E2E fit", json.dumps(summary.get("final", {}), default=str)[:600])
    # 4. serve the new run next to the base model: the rater's criterion on the same seeds
    seeds = list(range(10_000, 10_100))
    digits = [s % 10 for s in seeds]
    base = _rater_scores(client, "base", seeds, digits, rater)
    tuned = _rater_scores(client, "pref", seeds, digits, rater)
    acc = {name: float((s > math.log(0.5)).float().mean()) for name, s in (("base", base), ("tuned", tuned))}
    print(
        "E2E rater",
        json.dumps({"base_logp": float(base.mean()), "tuned_logp": float(tuned.mean()), "p>0.5": acc}),
    )
    assert float(tuned.mean()) > float(base.mean()) + 0.1, (float(base.mean()), float(tuned.mean()))
