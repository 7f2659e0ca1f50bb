"""Presets load the way real models load; bad model input gets clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from scoreaction.config import ConfigError, ModelConfig, SamplerConfig
from scoreaction.models import load_pipeline, write_tiny_pipeline
from scoreaction.models.presets import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG, from_pretrained
from scoreaction.policy import DiffusionPolicy
from scoreaction.sampling import sample_trajectories


def test_tiny_is_a_standard_safetensors_diffusers_folder(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    files = {p.name for p in tiny_dir.rglob("*") if p.is_file()}
    assert {"diffusion_pytorch_model.safetensors", "model.safetensors"} <= files
    assert "tokenizer.json" in files or {"vocab.json", "merges.txt"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt"))]
    sched = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == (
        "scaled_linear",
        0.00085,
        0.012,
    )


def test_tiny_save_load_gives_same_images(tiny_dir, tmp_path):
    """Writing the tiny pipeline again (same seed) and loading it gives the same images for the same seed."""
    again = write_tiny_pipeline(tmp_path / "tiny-again", seed=0)
    sampler = SamplerConfig(num_steps=4, guidance_scale=3.0)
    images = []
    for folder in (tiny_dir, again):
        policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(folder)))
        traj = sample_trajectories(policy, ["a cat", "a dog"], sampler, torch.Generator().manual_seed(0))
        images.append(traj.images)
    assert torch.equal(images[0], images[1])
    # and another seed of the weights is another model
    other = write_tiny_pipeline(tmp_path / "tiny-seed1", seed=1)
    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(other)))
    traj = sample_trajectories(policy, ["a cat", "a dog"], sampler, torch.Generator().manual_seed(0))
    assert not torch.allclose(traj.images, images[0])


def test_sd15_configs_have_sd15_sizes():
    """The sd15-random preset's configs give SD1.5's exact parameter counts (built on the meta device)."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == 123_060_480


def test_sd15_offline_error_says_how_to_use_a_local_folder():
    with pytest.raises(
        ConfigError,
        match=r"model.name_or_path='stable-diffusion-v1-5/stable-diffusion-v1-5'.*--set model.name_or_path=DIR",
    ):
        load_pipeline(ModelConfig(preset="sd15"))


def test_any_sd_folder_loads_through_name_or_path(tiny_dir, tmp_path):
    """An SD2-style v-prediction folder loads through model.name_or_path and samples finite images."""
    import shutil

    folder = tmp_path / "vpred"
    shutil.copytree(tiny_dir, folder)
    cfg_path = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    policy = DiffusionPolicy.from_config(ModelConfig(preset="sd15", name_or_path=str(folder)))
    assert policy.prediction_type == "v_prediction"
    traj = sample_trajectories(
        policy, ["a cat"], SamplerConfig(num_steps=3), torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(traj.images).all() and torch.isfinite(traj.log_probs).all()


def test_bad_model_paths(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    with pytest.raises(ConfigError, match="single checkpoint file"):
        from_pretrained(str(ckpt))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="without model_index.json"):
        from_pretrained(str(tmp_path / "empty"))


def test_pickle_only_pipeline_folder_is_refused(tiny_dir, tmp_path):
    """A diffusers folder whose weights are .bin (pickle) does not load: safetensors only."""
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    for f in folder.rglob("*.safetensors"):
        f.rename(
            f.with_name(f.name.replace(".safetensors", ".bin").replace("model.bin", "pytorch_model.bin"))
        )
    with pytest.raises(ConfigError, match="Only safetensors weights are accepted"):
        from_pretrained(str(folder))
