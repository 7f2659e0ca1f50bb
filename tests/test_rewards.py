"""Reward registry, JPEG rewards, the weighted sum and bad-input errors (no models, no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from scoreaction.config import ConfigError, build_config
from scoreaction.config.reward import RewardConfig
from scoreaction.rewards import (
    REWARDS,
    Reward,
    RewardError,
    RewardOutput,
    WeightedSum,
    build_monitors,
    build_named,
    build_reward,
    jpeg_size_kb,
    linear_reward,
)
from scoreaction.rewards.multi import RunningStats


def _fixed_images() -> torch.Tensor:
    """Three fixed 32x32 images: flat grey, a horizontal gradient, seeded noise. (3, 3, 32, 32) in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    flat = torch.full((3, 32, 32), 0.5)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 32).expand(3, 32, 32)
    noise = torch.rand((3, 32, 32), generator=g)
    return torch.stack([flat, ramp, noise])


def _pil_jpeg_kb(img: torch.Tensor, quality: int = 95) -> float:
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


def test_jpeg_rewards_match_a_direct_pil_computation():
    images = _fixed_images()
    expected = torch.tensor([_pil_jpeg_kb(x) for x in images])
    assert torch.equal(jpeg_size_kb(images), expected)
    comp = build_reward(RewardConfig(name="jpeg_compressibility"))
    incomp = build_reward(RewardConfig(name="jpeg_incompressibility"))
    assert torch.equal(comp(images, ["a"] * 3), -expected)
    out = incomp.score(images, ["a"] * 3)
    assert torch.equal(out.scores, expected) and torch.equal(out.info["jpeg_kb"], expected)
    assert out.scores.dtype == torch.float32 and out.scores.shape == (3,)
    # noise compresses worst, the flat image best
    assert expected[0] < expected[1] < expected[2]


def test_linear_toy_reward_unchanged():
    r = build_reward(build_config("toy-gmm").reward)
    x = torch.tensor([[1.5], [-2.0]])
    assert torch.equal(r(x, ["", ""]), torch.tensor([1.5, -2.0]))
    assert torch.equal(linear_reward([1.0, 2.0])(torch.tensor([[1.0, 1.0]]), [""]), torch.tensor([3.0]))
    with pytest.raises(ValueError, match=r"shape \(B, 2\)"):
        linear_reward([1.0, 2.0])(torch.ones(1, 3), [""])


class _Const(Reward):
    """A reward with known values: image i scores values[i] (to check the weighted sum by hand)."""

    def __init__(self, values: list[float]) -> None:
        self.values = torch.tensor(values)

    def _score(self, images, prompts):
        return RewardOutput(self.values[: images.shape[0]].clone())


def test_weighted_sum_equals_weighted_sum_of_parts():
    images = _fixed_images()
    cfg = RewardConfig(weights={"jpeg_compressibility": 0.5, "jpeg_incompressibility": 2.0}, normalize="none")
    multi = build_reward(cfg)
    kb = jpeg_size_kb(images)
    out = multi.score(images, ["p"] * 3)
    # 0.5 * (-kb) + 2.0 * kb = 1.5 kb
    torch.testing.assert_close(out.scores, 1.5 * kb, rtol=0, atol=1e-6)
    assert torch.equal(out.info["jpeg_compressibility"], -kb) and torch.equal(
        out.info["jpeg_incompressibility"], kb
    )


def test_running_normalisation_by_hand():
    a, b = _Const([1.0, 3.0]), _Const([10.0, 10.0])
    multi = WeightedSum({"a": a, "b": b}, {"a": 2.0, "b": 1.0}, normalize="running")
    images = torch.zeros(2, 3, 4, 4)
    # first call: a's stats over {1, 3}: mean 2, std 1 -> (-1, 1); b: mean 10, std 0 -> floor 1e-6, (0, 0)
    torch.testing.assert_close(multi(images, ["", ""]), torch.tensor([-2.0, 2.0]))
    # second call with a = (5, 7): stats over {1, 3, 5, 7}: mean 4, var (9+1+1+9)/4 = 5
    a.values = torch.tensor([5.0, 7.0])
    s5 = 5.0**0.5
    torch.testing.assert_close(multi(images, ["", ""]), 2.0 * torch.tensor([1.0 / s5, 3.0 / s5]))


def test_running_stats_match_numpy():
    rs = RunningStats()
    xs = np.random.default_rng(0).normal(3.0, 2.0, size=100)
    for chunk in np.split(xs, [7, 30, 31, 100]):
        rs.update(torch.tensor(chunk))
    assert rs.count == 100
    assert abs(rs.mean - xs.mean()) < 1e-12 and abs(rs.std - xs.std()) < 1e-12


def test_unknown_reward_name_lists_the_names():
    with pytest.raises(RewardError) as exc:
        build_named("aesthetics")
    for name in REWARDS:
        assert name in str(exc.value)
    with pytest.raises(ConfigError, match="reward.name='aesthetics'.*'aesthetic'"):
        build_config("tiny", overrides=["reward.name=aesthetics"])
    with pytest.raises(ConfigError, match="reward.weights.clipscore"):
        build_config("tiny", overrides=["reward.weights={clipscore: 1.0}"])


@pytest.mark.parametrize(
    "images, message",
    [
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "floating point in \\[0, 1\\], got dtype torch.uint8"),
        (torch.full((2, 3, 8, 8), 2.0), "must lie in \\[0, 1\\], got values in \\[2, 2\\]"),
        (torch.full((2, 3, 8, 8), -1.0), "x / 2 \\+ 0.5"),
        (torch.full((2, 3, 8, 8), float("nan")), "must lie in \\[0, 1\\]"),
        (torch.zeros(2, 8, 8), "shape \\(B, 3, H, W\\), got \\(2, 8, 8\\)"),
        (np.zeros((2, 3, 8, 8)), "must be a torch.Tensor"),
    ],
)
def test_bad_images_give_clear_errors(images, message):
    r = build_reward(RewardConfig(name="jpeg_compressibility"))
    with pytest.raises(RewardError, match=message):
        r(images, ["a", "b"])


def test_prompt_count_must_match():
    r = build_reward(RewardConfig(name="jpeg_incompressibility"))
    with pytest.raises(RewardError, match="list of 2 strings.*got 3 prompts"):
        r(torch.zeros(2, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(RewardError, match="list of 2 strings.*got 'ab'"):
        r(torch.zeros(2, 3, 8, 8), "ab")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="reward.weights=\\{\\}.*at least one"):
        build_config("tiny", overrides=["reward.weights={}"])
    with pytest.raises(ConfigError, match="reward.service='not a url'.*neither an http"):
        build_config("tiny", overrides=["reward.service=not a url"])
    with pytest.raises(ConfigError, match="reward.weights.*'linear'"):
        build_config("tiny", overrides=["reward.weights={linear: 1.0}"])
    cfg = build_config("tiny", overrides=["reward.weights={aesthetic: 1.0, jpeg_compressibility: 0.1}"])
    assert cfg.reward.optimised == {"aesthetic": 1.0, "jpeg_compressibility": 0.1}
    assert build_config("tiny").reward.optimised == {"jpeg_compressibility": 1.0}


def test_model_reward_without_weights_says_where_to_put_them():
    cfg = RewardConfig(name="aesthetic")
    with pytest.raises(
        RewardError, match="reward.aesthetic.mlp_weights is not set.*convert_reward_weights.py aesthetic"
    ):
        build_reward(cfg)
    cfg = RewardConfig(name="clip_score")  # ViT-L-14 + openai: a hub repo, offline in tests
    with pytest.raises(
        RewardError,
        match="reward.clip_score.weights='timm/vit_large_patch14_clip_224.openai'.*HF_HUB_OFFLINE.*set reward.clip_score.weights to the local file",
    ):
        build_reward(cfg)
    with pytest.raises(RewardError, match="reward.hpsv2.weights is not set"):
        build_reward(RewardConfig(name="hpsv2"))
    with pytest.raises(RewardError, match="reward.pickscore.model='yuvalkirstain/PickScore_v1'.*Offline"):
        build_reward(RewardConfig(name="pickscore"))
    with pytest.raises(RewardError, match="reward.clip_score.pretrained='laion9000'.*allowed: openai"):
        build_reward(RewardConfig(name="clip_score", clip_score={"pretrained": "laion9000"}))


def test_monitors_are_built_by_name():
    mons = build_monitors(RewardConfig(monitor=["jpeg_incompressibility"]))
    images = _fixed_images()
    assert list(mons) == ["jpeg_incompressibility"]
    assert torch.equal(mons["jpeg_incompressibility"](images, ["a"] * 3), jpeg_size_kb(images))
    assert build_monitors(RewardConfig()) == {}
