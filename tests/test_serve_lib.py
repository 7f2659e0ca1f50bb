"""The Ray-free part of serving: model ids and the catalog, deterministic generation, request models."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_lora
from PIL import Image
from pydantic import ValidationError

from scoreaction.checkpoint import CheckpointError, load_checkpoint, save_run_checkpoint
from scoreaction.config import ModelConfig, SamplerConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.sampling import sample_trajectories
from scoreaction.serving.api import GenerateRequest, OpenAIImageRequest
from scoreaction.serving.catalog import CheckpointCatalog, ModelIdError, UnknownModelError, validate_model_id
from scoreaction.serving.generate import ImageGenerator, LoadedModel, images_to_uint8
from scoreaction.serving.spec import GenerationSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the serve/ package at the repo root
from serve.web import prefers_png  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads spend most of their time in barrier
    waits (a 6-step sample took 117 s instead of 2 s under load). Both sides of every comparison here run in
    this process, so the thread count does not change what is compared."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def png_array(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_dir):
    """outputs-like root: run 'demo' with steps 1 and 2 (finished, summary.json), run 'live' with step 1."""
    root = tmp_path_factory.mktemp("outputs")
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    cfg = {"reward": {"name": "jpeg_compressibility"}}
    randomize_lora(policy, seed=1)
    save_run_checkpoint(policy, root / "demo", 1, cfg, {"rollout/reward_mean": -3.5})
    randomize_lora(policy, seed=2)
    save_run_checkpoint(policy, root / "demo", 2, cfg, {"rollout/reward_mean": -3.4})
    (root / "demo" / "summary.json").write_text(json.dumps({"epochs": 2, "final": {"reward_mean": -3.25}}))
    save_run_checkpoint(policy, root / "live", 1, cfg, {"rollout/reward_mean": -3.0})
    (root / "not-a-run").mkdir()
    return root


@pytest.mark.parametrize(
    "bad", ["../demo", "demo/..", "a/b", "a\\b", "..", "demo@../x", "/etc/passwd", "demo@step_1/x"]
)
def test_path_like_model_ids_are_refused(bad, root):
    with pytest.raises(ModelIdError, match="never contain '/', '\\\\' or '..'"):
        CheckpointCatalog(root).resolve(bad)


@pytest.mark.parametrize("bad", ["", " demo", "demo@latest", "demo@step_x", "-x", "a b"])
def test_malformed_model_ids_name_the_allowed_forms(bad):
    with pytest.raises(ModelIdError, match="base|empty"):
        validate_model_id(bad)


def test_catalog_lists_base_runs_and_checkpoints_with_step_and_reward(root):
    models = {m["id"]: m for m in CheckpointCatalog(root).list_models()}
    assert list(models) == [
        "base",
        "demo@step_000001",
        "demo@step_000002",
        "demo",
        "live@step_000001",
        "live",
    ]
    assert models["demo@step_000001"]["step"] == 1 and models["demo@step_000001"]["reward"] == -3.5
    assert models["demo@step_000001"]["reward_source"] == "checkpoint.metrics"
    # the finished run's last checkpoint carries the final evaluation from summary.json
    assert models["demo@step_000002"]["reward"] == -3.25
    assert models["demo@step_000002"]["reward_source"] == "summary.final"
    assert models["demo"]["alias_of"] == "demo@step_000002" and models["demo"]["kind"] == "run"
    assert models["live"]["reward"] == -3.0 and models["live"]["reward_name"] == "jpeg_compressibility"


def test_resolve_follows_latest_and_refuses_unknown(root, tiny_dir, tmp_path):
    cat = CheckpointCatalog(root)
    assert cat.resolve("base").path is None
    assert cat.resolve("demo").id == "demo@step_000002"
    assert cat.resolve("demo@step_000001").path == str((root / "demo/checkpoints/step_000001").resolve())
    with pytest.raises(UnknownModelError, match="no checkpoint step_000009"):
        cat.resolve("demo@step_000009")
    with pytest.raises(UnknownModelError, match="no run folder 'nope'"):
        cat.resolve("nope")
    with pytest.raises(UnknownModelError):
        cat.resolve("not-a-run")
    # a run folder that is a symlink out of the root is neither listed nor served
    link_root = tmp_path / "root2"
    link_root.mkdir()
    os.symlink(root / "demo", link_root / "linked")
    assert CheckpointCatalog(link_root).runs() == {}
    with pytest.raises(UnknownModelError):
        CheckpointCatalog(link_root).resolve("linked")
    # a root that is itself one run folder serves that run under its folder name
    assert CheckpointCatalog(root / "demo").resolve("demo").id == "demo@step_000002"


def test_checkpoint_written_later_appears_and_key_changes_when_rewritten(root, tiny_dir):
    cat = CheckpointCatalog(root)
    before = cat.resolve("live")
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    save_run_checkpoint(policy, root / "live", 2, metrics={"rollout/reward_mean": -2.9})
    assert "live@step_000002" in [m["id"] for m in cat.list_models()]
    assert cat.resolve("live").id == "live@step_000002"
    save_run_checkpoint(policy, root / "live", 1)  # rewritten in place: new cache key
    assert cat.resolve("live@step_000001").key != before.key


@pytest.fixture(scope="module")
def generator(tiny_dir):
    return ImageGenerator(
        DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir))), 4
    )


def test_lone_request_equals_the_training_sampler(generator, root):
    """chunk=1: a request's image is bit-identical to sample_trajectories with the same seed (base and
    checkpoint); chunk=4 changes only float rounding."""
    one = ImageGenerator(generator.policy, chunk=1)
    spec = GenerationSpec(prompt="a cat", seed=3, num_inference_steps=6, guidance_scale=5.0, eta=0.7)
    sampler = SamplerConfig(num_steps=6, guidance_scale=5.0, eta=0.7)
    base = one.generate(LoadedModel("base"), [spec])[0][0]
    with generator.policy.reference():
        traj = sample_trajectories(generator.policy, ["a cat"], sampler, torch.Generator().manual_seed(3))
    assert np.array_equal(png_array(base), images_to_uint8(traj.images)[0].numpy())

    ckpt = root / "demo" / "checkpoints" / "step_000001"
    tuned = one.generate(one.load("k", str(ckpt)), [spec])[0][0]
    reference = DiffusionPolicy.from_config(
        ModelConfig(preset="tiny", name_or_path=generator.policy.base_model)
    )
    load_checkpoint(reference, ckpt)
    traj = sample_trajectories(reference, ["a cat"], sampler, torch.Generator().manual_seed(3))
    assert np.array_equal(png_array(tuned), images_to_uint8(traj.images)[0].numpy())
    assert not np.array_equal(png_array(tuned), png_array(base))  # the checkpoint matters
    four = generator.generate(LoadedModel("base"), [spec])[0][0]
    assert np.abs(png_array(four).astype(int) - png_array(base).astype(int)).max() <= 2


def test_images_do_not_depend_on_the_batch(generator):
    """Same seed and parameters -> the same PNG bytes, alone or batched with other requests (any order)."""
    spec = GenerationSpec(prompt="a red bicycle", seed=11, num_inference_steps=4, guidance_scale=7.5)
    others = [
        GenerationSpec(prompt=f"dog {i}", seed=i, n=1 + i % 3, num_inference_steps=4, guidance_scale=7.5)
        for i in range(4)
    ]
    model = LoadedModel("base")
    alone = generator.generate(model, [spec])[0]
    batched = generator.generate(model, [*others[:3], spec, others[3]])[3]
    assert alone == batched
    # n images share one seed (as sample_trajectories([prompt] * n)): distinct, and reproducible in a batch
    spec2 = GenerationSpec(**{**spec.__dict__, "n": 2})
    two = generator.generate(model, [spec2])[0]
    assert two[0] != two[1] and generator.generate(model, [others[0], spec2])[1] == two


def test_adapters_load_and_unload_and_pickles_are_refused(generator, root, tmp_path):
    spec = GenerationSpec(prompt="x", seed=0, num_inference_steps=2)
    m1 = generator.load("a", str(root / "demo/checkpoints/step_000001"))
    m2 = generator.load("b", str(root / "demo/checkpoints/step_000002"))
    a, b = generator.generate(m1, [spec])[0], generator.generate(m2, [spec])[0]
    assert a != b and generator.generate(m1, [spec])[0] == a  # switching adapters is exact
    m1.unload()
    assert m1.adapter not in generator.policy.unet.peft_config
    del m2  # __del__ (Serve's LRU eviction hook) unloads too
    assert [n for n in generator.policy.unet.peft_config if n.startswith("served_")] == []
    bad = tmp_path / "pickled"
    bad.mkdir()
    torch.save({"x": torch.zeros(1)}, bad / "pytorch_lora_weights.bin")
    (bad / "checkpoint.json").write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(CheckpointError, match="only safetensors"):
        generator.load("c", str(bad))


def test_request_models_are_strict_and_bounded():
    ok = GenerateRequest(prompt="a", height=64, width=1024, n=4, guidance_scale=0, num_inference_steps=150)
    assert ok.seed is None
    bad = [
        {"num_inference_steps": "20"},
        {"num_inference_steps": 0},
        {"num_inference_steps": 151},
        {"guidance_scale": float("nan")},
        {"guidance_scale": float("inf")},
        {"guidance_scale": 30.5},
        {"eta": 0},
        {"n": True},
        {"n": 5},
        {"height": -8},
        {"height": 1032},
        {"width": 60},
        {"prompt": "x" * 1001},
        {"prompt": ""},
        {"seed": -1},
        {"colour": "red"},
    ]
    for over in bad:
        with pytest.raises(ValidationError) as info:
            GenerateRequest.model_validate({"prompt": "a", **over})
        assert info.value.errors()[0]["loc"][0] == next(iter(over)), over
    assert OpenAIImageRequest(prompt="a", size="64x32").to_native(5, 1.0).height == 32
    for size in ("64", "64x60", "0x64", "2048x64", "64X64"):
        with pytest.raises(ValidationError, match="size|width|height"):
            OpenAIImageRequest(prompt="a", size=size)
    with pytest.raises(ValidationError, match="b64_json"):
        OpenAIImageRequest(prompt="a", response_format="url")


def test_png_negotiation():
    assert prefers_png("image/png")
    assert prefers_png("image/png, application/json;q=0.5")
    assert not prefers_png("application/json, image/png;q=0.5")
    assert not prefers_png("*/*") and not prefers_png(None) and not prefers_png("application/json")
