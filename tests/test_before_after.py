"""The before/after grid: the base model and a checkpoint on the same seeds, one labelled row per prompt."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from scoreaction.before_after import before_after, write_grid
from scoreaction.config import build_config


def test_write_grid_checks_its_shapes(tmp_path):
    a = torch.rand(6, 3, 8, 8)
    path = write_grid(a, a.flip(0), ["p0", "p1"], tmp_path / "g.png", "title")
    assert Image.open(path).format == "PNG"
    with pytest.raises(ValueError, match="len\\(prompts\\)=4"):
        write_grid(a, a, ["a", "b", "c", "d"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="must be equal"):
        write_grid(a, a[:4], ["p0", "p1"], tmp_path / "x.png")


def test_before_after_of_a_lora_checkpoint(fresh_policy, tiny_dir, tmp_path):
    from conftest import randomize_lora

    from scoreaction.checkpoint import save_run_checkpoint

    cfg = build_config(
        "tiny",
        overrides=[
            f"model.name_or_path={tiny_dir}",
            "sampler.num_steps=2",
            "run.prompts=[a cat, a dog, a cat]",
        ],
    )
    randomize_lora(fresh_policy)
    ckpt = save_run_checkpoint(fresh_policy, tmp_path / "run", 1, cfg.model_dump())
    out = before_after(cfg, ckpt, tmp_path / "samples" / "before_after.png", per_prompt=2)
    assert out["prompts"] == ["a cat", "a dog"]  # each prompt once, in order
    assert "base" not in out  # the classifier accuracy is measured for digits only
    image = Image.open(out["grid"])
    assert image.format == "PNG" and image.size[0] > image.size[1]
