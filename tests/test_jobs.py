"""The main job's command line, end to end in-process on the tiny preset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import finetune  # noqa: E402


def test_finetune_writes_grid_curve_checkpoint_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--output-dir",
        str(out),
        "--set",
        "run.num_samples=4",
        "--set",
        "sampler.num_steps=3",
        "--set",
        "run.epochs=2",
        "--set",
        "algorithm.micro_batch_size=2",
    ]
    assert finetune.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "ctrl" and summary["samples"] == 8 and len(summary["per_epoch"]) == 2
    assert set(summary["final"]) >= {"reward_mean", "kl_mean", "objective"}
    assert (out / "samples" / "grid_final.png").stat().st_size > 0
    assert (out / "reward_curve.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (out / "checkpoints" / "step_000002" / "pytorch_lora_weights.safetensors").is_file()

    # Another run into the same folder: a clear error, nothing overwritten.
    before = (out / "summary.json").read_bytes()
    assert finetune.main(args) == 2
    assert "already holds a run's checkpoints" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "sd99"], "allowed presets: tiny, toy-gmm, sd15, sd15-random"),
        (["--set", "sampler.num_steps=0"], "sampler.num_steps=0: Input should be greater than or equal to 1"),
        (["--set", "sampler.eta=2"], "sampler.eta=2: Input should be less than or equal to 1"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    assert finetune.main([*args, "--output-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
