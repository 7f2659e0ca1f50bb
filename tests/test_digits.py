"""The digits preset: data, pretraining, the classifier rewards, the quality and diversity measures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scoreaction.models import digits as D
from scoreaction.models import digits_data as DD
from scoreaction.rewards import digits as R


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    """A digits pipeline pretrained briefly on a small subset (seconds)."""
    settings = D.PretrainSettings(seed=0, vae_steps=20, text_steps=20, unet_steps=20, batch_size=8, subset=32)
    out = tmp_path_factory.mktemp("digits") / "model"
    return D.pretrain_digits(out, settings, progress=False)


# ---- data ----------------------------------------------------------------------------------------


def test_images_prompts_and_split():
    images, labels = DD.load_digit_images()
    assert images.shape == (1797, 3, 16, 16) and labels.shape == (1797,)
    assert images.dtype == torch.float32 and float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])  # grey RGB
    # ink bright on dark, as in scikit-learn's arrays (0 = background, 16 = ink): compare each 16 px pixel with
    # the 8x8 value it was upsampled from
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).float().repeat_interleave(2, 1).repeat_interleave(2, 2)
    grey = images[:, 0]
    assert float(grey[raw == 0].mean()) < 0.15 and float(grey[raw >= 12].mean()) > 0.6
    assert D.PROMPTS == tuple(f"a handwritten digit {d}" for d in range(10))
    parts = DD.split_indices()
    all_idx = np.concatenate(list(parts.values()))
    assert len(all_idx) == 1797 and len(np.unique(all_idx)) == 1797  # disjoint and complete
    for name, frac in DD.SPLITS.items():
        counts = np.bincount(labels.numpy()[parts[name]], minlength=10)
        assert (counts > 0).all() and abs(len(parts[name]) / 1797 - frac) < 0.01, name
    assert all(np.array_equal(parts[k], DD.split_indices()[k]) for k in parts)  # deterministic
    with pytest.raises(ValueError, match="split='train'"):
        D.digit_split("train")


# ---- pretraining ---------------------------------------------------------------------------------


def test_pretraining_lowers_loss_and_round_trips(small_digits):
    from diffusers import StableDiffusionPipeline

    from scoreaction.config import ModelConfig
    from scoreaction.models.presets import load_pipeline

    r = small_digits
    assert np.mean(r.unet_losses[-5:]) < np.mean(r.unet_losses[:5])
    assert np.mean(r.vae_losses[-5:]) < np.mean(r.vae_losses[:5])
    assert r.text_losses[-1] < 0.5 * r.text_losses[0]  # the prompts' contexts drift apart
    d = r.directory
    assert (d / "loss.png").stat().st_size > 1000
    meta = json.loads((d / "pretrain.json").read_text())
    assert meta["settings"]["subset"] == 32 and len(meta["unet_losses"]) == 20
    weights = sorted(p.name for p in d.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt"))
    assert weights and all(w.endswith(".safetensors") for w in weights)
    pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer("a handwritten digit 7").input_ids[:2] == [49406, 320]  # SD's CLIP BPE ("a")
    assert math.isclose(pipe.vae.config.scaling_factor, meta["vae_scaling_factor"], rel_tol=1e-6)
    img = pipe(
        "a handwritten digit 3", num_inference_steps=2, output_type="pt", generator=torch.manual_seed(0)
    )
    assert img.images.shape == (1, 3, 16, 16)
    # the preset loader takes the folder too
    pipe2 = load_pipeline(ModelConfig(preset="digits", name_or_path=str(d)))
    sd1, sd2 = pipe.unet.state_dict(), pipe2.unet.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_pretraining_is_deterministic_and_keeps_existing_folders(tmp_path):
    s = D.PretrainSettings(seed=3, vae_steps=2, text_steps=2, unet_steps=2, batch_size=4, subset=8)
    a = D.pretrain_digits(tmp_path / "a", s, progress=False)
    b = D.pretrain_digits(tmp_path / "b", s, progress=False)
    assert a.unet_losses == b.unet_losses
    ua = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    ub = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        D.pretrain_digits(keep, s, progress=False)
    assert (keep / "notes.txt").read_text() == "precious"


# ---- rewards -------------------------------------------------------------------------------------


def test_classifiers_score_the_right_digit_highest():
    from scoreaction.config.reward import RewardConfig
    from scoreaction.rewards import build_monitors, build_reward

    reward = build_reward(RewardConfig(name="digit_classifier", device="cpu"))
    monitors = build_monitors(RewardConfig(name="digit_classifier", monitor=["digit_classifier_heldout"]))
    heldout = monitors["digit_classifier_heldout"]
    images, labels = D.digit_split("eval")
    for r in (reward, heldout):
        scores = torch.stack([r(images, [D.PROMPTS[d]] * len(images)) for d in range(10)], dim=1)  # (n, 10)
        assert (scores <= 0).all()
        right = scores.gather(1, labels[:, None]).squeeze(1)
        wrong = (scores.sum(1) - right) / 9
        assert float((right > wrong).float().mean()) > 0.95
        assert float((scores.argmax(1) == labels).float().mean()) > 0.9
        out = r.score(images, [D.PROMPTS[int(y)] for y in labels])
        assert float(out.info["correct"].mean()) > 0.9
    # two different models (seeds and data): they disagree somewhere
    noise = torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    both = torch.cat([images, noise])
    assert (reward.predict(both) != heldout.predict(both)).any()


def test_classifier_reward_errors_and_gradient():
    from scoreaction.rewards import RewardError, build_named

    reward = build_named("digit_classifier")
    images, _ = D.digit_split("eval")
    with pytest.raises(RewardError, match=r"prompts\[1\]='a photo of a cat' names no digit"):
        reward(images[:2], ["a handwritten digit 1", "a photo of a cat"])
    x = images[:4].clone().requires_grad_(True)
    reward(x, ["a handwritten digit 5"] * 4).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    # another image size is resized to the classifier's
    big = torch.nn.functional.interpolate(images[:8], size=(32, 32), mode="bilinear")
    assert reward(big, ["a handwritten digit 0"] * 8).shape == (8,)


def test_frechet_distance_and_diversity():
    eval_images, _ = D.digit_split("eval")
    other, _ = D.digit_split("reward")
    assert R.digit_fid(eval_images, eval_images) < 1e-6
    real = R.digit_fid(other)  # disjoint real digits against the eval split
    noise = R.digit_fid(torch.rand(300, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    blank = R.digit_fid(torch.zeros(300, 3, 16, 16) + 0.01 * torch.rand(300, 3, 16, 16))
    assert real < 0.1 * noise and real < 0.1 * blank, (real, noise, blank)
    same = eval_images[:1].repeat(6, 1, 1, 1)
    assert R.diversity(same, ["a handwritten digit 0"] * 6) == 0.0
    prompts = [D.PROMPTS[i % 2] for i in range(12)]
    assert R.diversity(eval_images[:12], prompts) > 0.1
    with pytest.raises(ValueError, match="two or more"):
        R.diversity(eval_images[:2], D.PROMPTS[:2])
    with pytest.raises(ValueError, match="same d"):
        R.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_digits_preset_config():
    from scoreaction.config import build_config

    cfg = build_config("digits")
    assert cfg.model.preset == "digits" and cfg.reward.name == "digit_classifier"
    assert cfg.reward.monitor == ["digit_classifier_heldout"]
    assert cfg.run.prompts == list(D.PROMPTS)


# ---- the shipped weights -------------------------------------------------------------------------


def _state_dicts_equal(a, b) -> bool:
    return all(
        set(getattr(a, n).state_dict()) == set(getattr(b, n).state_dict())
        and all(torch.equal(v, getattr(b, n).state_dict()[k]) for k, v in getattr(a, n).state_dict().items())
        for n in ("unet", "vae", "text_encoder")
    )


def test_export_and_materialize_round_trip(small_digits, tmp_path):
    from scoreaction.models import digits_shipped as S
    from scoreaction.models.presets import from_pretrained

    path = S.export_weights(small_digits.directory, tmp_path / "w.safetensors")
    meta = S.read_metadata(path)
    assert meta["seed"] == "0" and json.loads(meta["settings"])["subset"] == 32
    assert not S.matches_defaults(path, 0)  # a subset model is not the preset's
    rows = load_file(path)["text_encoder.token_rows.ids"]
    assert 10 <= len(rows) <= 20  # the prompts' tokens only, not the 49,408-row vocabulary
    rebuilt = S.materialize(path, tmp_path / "rebuilt")
    a, b = from_pretrained(str(small_digits.directory)), from_pretrained(str(rebuilt))
    assert _state_dicts_equal(a, b)
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor
    with pytest.raises(ValueError, match="not a digits weights file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
        S.materialize(tmp_path / "other.safetensors", tmp_path / "x")


def test_shipped_weights_are_the_default_pretraining_and_load(tmp_path, monkeypatch):
    """The preset's seed-0 model comes from the shipped file: small, the code's default settings, and a
    folder that plain diffusers loads."""
    from diffusers import StableDiffusionPipeline

    from scoreaction.models import digits_shipped as S

    path = S.shipped_weights_path(0)
    assert path.is_file(), "rebuild with: python jobs/pretrain.py --output-dir /tmp/digits --force --export"
    assert path.stat().st_size <= 10 * 2**20
    assert S.matches_defaults(path, 0), (
        "the shipped weights were pretrained with other settings: re-export them"
    )
    monkeypatch.setenv("SCOREACTION_CACHE", str(tmp_path))
    directory = D.digits_pipeline_dir(0)
    assert directory.parent == tmp_path / "models" and (directory / "shipped.json").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(directory, safety_checker=None, use_safetensors=True)
    shipped = load_file(path)
    unet = pipe.unet.state_dict()
    assert all(torch.equal(unet[k[5:]], v) for k, v in shipped.items() if k.startswith("unet."))
    pipe.set_progress_bar_config(disable=True)
    img = pipe(D.PROMPTS[3], num_inference_steps=2, output_type="pt", generator=torch.manual_seed(0)).images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()


# ---- the quality bar (minutes) -------------------------------------------------------------------


def _quality(directory) -> dict:
    from scoreaction.config import build_config
    from scoreaction.models.presets import from_pretrained

    cfg = build_config("digits")
    pipe = from_pretrained(str(directory))
    pipe.set_progress_bar_config(disable=True)
    with D.torch_threads(1):
        return R.base_quality(
            pipe,
            20,
            num_steps=cfg.sampler.num_steps,
            guidance_scale=cfg.sampler.guidance_scale,
            eta=cfg.sampler.eta,
        )


def _assert_quality_bar(q: dict) -> None:
    """The base draws the prompted digit often but not always (QUALITY_BAND, by the held-out classifier),
    every digit at least sometimes, and real-looking digits (Frechet distance far below noise's)."""
    assert q["n"] >= 200
    assert D.QUALITY_BAND[0] <= q["accuracy_heldout"] <= D.QUALITY_BAND[1], q
    assert min(q["accuracy_heldout_per_digit"]) > 0, q
    noise = R.digit_fid(torch.rand(200, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert q["fid"] < 0.25 * noise, (q["fid"], noise)


@pytest.mark.slow
def test_shipped_model_meets_the_quality_bar(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOREACTION_CACHE", str(tmp_path))
    q = _quality(D.digits_pipeline_dir(0))
    print("digits shipped base:", json.dumps(q))
    _assert_quality_bar(q)


@pytest.mark.slow
def test_full_pretraining_meets_the_quality_bar(tmp_path):
    """The default pretraining, from scratch (3-9 minutes on 2 cores)."""
    result = D.pretrain_digits(tmp_path / "digits", progress=False)
    q = _quality(result.directory)
    print("digits base:", json.dumps(q), f"pretraining {result.seconds:.0f} s")
    _assert_quality_bar(q)
