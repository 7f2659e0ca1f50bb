"""Checkpoints: diffusers-compatible LoRA, full UNet folders, atomic writes, no pickles."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import randomize_lora
from diffusers import StableDiffusionPipeline

from scoreaction.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    save_run_checkpoint,
)
from scoreaction.config import ModelConfig, PolicyConfig, SamplerConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.sampling import sample_trajectories

PROMPTS = ["a photo of a cat", "a lighthouse at dusk"]


def test_lora_checkpoint_loads_into_plain_diffusers_pipeline(fresh_policy, tiny_dir, tmp_path):
    """A saved LoRA loads with StableDiffusionPipeline.load_lora_weights and reproduces the policy's images."""
    randomize_lora(fresh_policy)
    sampler = SamplerConfig(num_steps=8, guidance_scale=5.0)
    traj = sample_trajectories(fresh_policy, PROMPTS, sampler, torch.Generator().manual_seed(7))
    path = save_checkpoint(fresh_policy, tmp_path / "ckpt", step=3, config={"sampler": sampler.model_dump()})
    assert sorted(os.listdir(path)) == ["README.md", "checkpoint.json", "pytorch_lora_weights.safetensors"]

    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            PROMPTS,
            num_inference_steps=8,
            guidance_scale=5.0,
            eta=1.0,
            output_type="pt",
            generator=torch.Generator().manual_seed(7),
        ).images

    base = run()
    pipe.load_lora_weights(str(path))
    tuned = run()
    assert float((base - traj.images).abs().max()) > 1e-2  # the adapter matters...
    torch.testing.assert_close(tuned, traj.images, atol=1e-4, rtol=0)  # ...and is reproduced exactly


def test_lora_roundtrip_into_policy(fresh_policy, tiny_dir, tmp_path):
    randomize_lora(fresh_policy, seed=5)
    path = save_checkpoint(fresh_policy, tmp_path / "ckpt", step=11)
    other = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    meta = load_checkpoint(other, path)
    assert meta["step"] == 11 and meta["kind"] == "lora" and meta["lora"]["rank"] == 4
    a, b = fresh_policy.trainable_state_dict(), other.trainable_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_checkpoint_roundtrip(tiny_dir, tmp_path):
    cfg = ModelConfig(preset="tiny", name_or_path=str(tiny_dir))
    policy = DiffusionPolicy.from_config(cfg, PolicyConfig(mode="full"))
    with torch.no_grad():
        policy.unet.conv_out.weight.add_(0.01)
    path = save_checkpoint(policy, tmp_path / "full", step=2)
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    other = DiffusionPolicy.from_config(cfg, PolicyConfig(mode="full"))
    load_checkpoint(other, path)
    assert torch.equal(other.unet.conv_out.weight, policy.unet.conv_out.weight)
    # the reference stays the pretrained UNet
    with other.reference():
        assert not torch.equal(other.unet.conv_out.weight, policy.unet.conv_out.weight)
    lora_policy = DiffusionPolicy.from_config(cfg)
    with pytest.raises(CheckpointError, match="is a full checkpoint but policy.mode='lora'"):
        load_checkpoint(lora_policy, path)


def test_atomic_replace_and_latest_pointer(fresh_policy, tmp_path):
    run = tmp_path / "run"
    first = save_run_checkpoint(fresh_policy, run, step=1)
    assert latest_checkpoint(run) == first
    second = save_run_checkpoint(fresh_policy, run, step=2)
    assert latest_checkpoint(run) == second
    again = save_checkpoint(fresh_policy, second, step=2, metrics={"reward_mean": 1.0})
    assert read_metadata(again)["metrics"] == {"reward_mean": 1.0}
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # a crash mid-save leaves only a hidden temp folder; latest still names a complete checkpoint
    (run / "checkpoints" / ".step_000003.tmp-dead").mkdir()
    assert latest_checkpoint(run) == second


def test_pickle_checkpoints_are_refused(fresh_policy, tmp_path):
    pkl = tmp_path / "weights.bin"
    torch.save({"a": torch.zeros(1)}, pkl)
    with pytest.raises(CheckpointError, match=r"weights.bin.*pickle format \(.bin\); only safetensors"):
        load_checkpoint(fresh_policy, pkl)
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save({"a": torch.zeros(1)}, folder / "pytorch_lora_weights.bin")
    (folder / "checkpoint.json").write_text(json.dumps({"kind": "lora"}))
    with pytest.raises(CheckpointError, match="holds only pickle weights"):
        load_checkpoint(fresh_policy, folder)


def test_incomplete_or_foreign_checkpoints(fresh_policy, tmp_path):
    with pytest.raises(CheckpointError, match="has no checkpoint.json"):
        load_checkpoint(fresh_policy, tmp_path)
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(fresh_policy, tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"kind": "dreambooth"}))
    with pytest.raises(CheckpointError, match="kind='dreambooth'; allowed: 'lora', 'full', 'toy'"):
        load_checkpoint(fresh_policy, tmp_path)
