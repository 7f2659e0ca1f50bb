"""Checkpoints carry a diffusers-style model card, and a LoRA of a short run loads into plain diffusers."""

from __future__ import annotations

import pytest
import torch
import yaml

from scoreaction.config import build_config

SHORT = [
    "run.epochs=1",
    "run.num_samples=4",
    "sampler.num_steps=2",
    "sampler.batch_size=4",
    "algorithm.micro_batch_size=4",
    "algorithm.learning_rate=0.05",
    "value.pretrain_epochs=1",
    "value.updates_per_epoch=1",
]


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _images(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        ["a photo of a cat"] * 2,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def _loads_and_changes_images(ckpt) -> dict:
    """What the card tells a diffusers user to do: from_pretrained(base_model), then load_lora_weights."""
    from diffusers import StableDiffusionPipeline

    meta = _front_matter((ckpt / "README.md").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(meta["base_model"], safety_checker=None)
    before = _images(pipe)
    pipe.load_lora_weights(str(ckpt))
    after = _images(pipe)
    assert before.shape == after.shape
    assert (after - before).abs().max() > 1e-3, "the tuned LoRA does not change the images"
    return meta


def test_lora_checkpoint_card_loads_in_plain_diffusers(fresh_policy, tiny_dir, tmp_path):
    from conftest import randomize_lora

    from scoreaction.checkpoint import save_run_checkpoint

    cfg = build_config("tiny", overrides=[f"model.name_or_path={tiny_dir}"])
    randomize_lora(fresh_policy)
    ckpt = save_run_checkpoint(fresh_policy, tmp_path, 2, cfg.model_dump())
    meta = _loads_and_changes_images(ckpt)
    assert meta["base_model"] == str(tiny_dir) and meta["library_name"] == "diffusers"
    card = (ckpt / "README.md").read_text()
    assert f"`{cfg.reward.name}`" in card and f"epoch 2 of {cfg.run.epochs}" in card


@pytest.mark.slow
def test_model_card_of_a_short_run_loads_in_plain_diffusers(tiny_dir, tmp_path):

    from scoreaction.checkpoint import latest_checkpoint
    from scoreaction.trainer import Trainer

    out = tmp_path / "run"
    cfg = build_config("tiny", overrides=[*SHORT, f"model.name_or_path={tiny_dir}", f"run.output_dir={out}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, out).fit()
    finally:
        torch.set_num_threads(threads)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    meta = _loads_and_changes_images(ckpt)
    card = (ckpt / "README.md").read_text()
    assert meta["base_model"] == str(tiny_dir) and meta["library_name"] == "diffusers"
    assert "lora" in meta["tags"] and "ctrl" in meta["tags"]
    assert f"`{cfg.reward.name}`" in card and "epoch 1 of 1" in card and "load_lora_weights" in card


def test_model_card_names_a_loadable_base_or_says_it_has_none():
    from scoreaction.model_card import model_card

    meta = {
        "kind": "full",
        "step": 3,
        "config": {
            "model": {"preset": "sd15", "name_or_path": None},
            "reward": {"name": "aesthetic", "monitor": ["pickscore"]},
            "algorithm": {"name": "ddpo", "learning_rate": 1e-4, "kl_coef": 0.0},
            "run": {"epochs": 10, "num_samples": 8},
        },
    }
    card = model_card(meta)
    fm = _front_matter(card)
    assert fm["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5" or "/" in fm["base_model"]
    assert "lora" not in fm["tags"] and "ddpo" in fm["tags"]
    assert "epoch 3 of 10, 24 trajectories" in card and "UNet2DConditionModel" in card
    assert "monitored by pickscore" in card
    random = model_card({**meta, "config": {**meta["config"], "model": {"preset": "sd15-random"}}})
    assert _front_matter(random)["base_model"] == "sd15-random" and "no folder to load" in random
