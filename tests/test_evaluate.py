"""jobs/evaluate.py: a checkpoint evaluated at several step counts, end to end in-process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from scoreaction.config import build_config
from scoreaction.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-run")
    cfg = build_config(
        "toy-gmm",
        overrides=[
            "run.epochs=1",
            "run.num_samples=256",
            "algorithm.micro_batch_size=128",
            f"run.output_dir={out}",
        ],
    )
    Trainer(cfg).fit()
    return out


def test_toy_checkpoint_samples_are_saved_per_step_count(toy_run, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        "--checkpoint",
        str(toy_run),
        "--num-samples",
        "300",
        "--num-steps",
        "5,10",
        "--output-dir",
        str(out),
    ]
    assert evaluate.main(args) == 0
    report = json.loads((out / "evaluation.json").read_text())
    assert report["preset"] == "toy-gmm" and report["step"] == 1
    assert [r["num_steps"] for r in report["results"]] == [5, 10]
    for r in report["results"]:
        x = np.load(out / f"samples_{r['num_steps']}.npy")
        assert x.shape == (300, 1) and np.isfinite(x).all()
        # the reported reward is the linear reward a^T x (a = 1) of exactly these samples
        assert r["reward_mean"] == pytest.approx(float(x.mean()), abs=1e-5)
        assert r["objective"] == pytest.approx(r["reward_mean"] - 2.0 * r["kl_mean"])
    assert "evaluation.json" in capsys.readouterr().out


def test_tiny_checkpoint_gets_a_grid_per_step_count(tiny_dir, tmp_path):
    run = tmp_path / "run"
    cfg = build_config(
        "tiny",
        overrides=[
            f"model.name_or_path={tiny_dir}",
            "run.epochs=0",
            "run.num_samples=2",
            "sampler.num_steps=2",
            f"run.output_dir={run}",
        ],
    )
    Trainer(cfg).fit()
    ckpt = run / "checkpoints" / "step_000000"
    assert evaluate.main(["--checkpoint", str(ckpt), "--num-samples", "2", "--num-steps", "1,3"]) == 0
    out = run / "eval" / "step_000000"  # the default: next to the checkpoints, never inside one
    assert (out / "grid_1.png").stat().st_size > 0 and (out / "grid_3.png").stat().st_size > 0
    assert not (ckpt / "eval").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-steps", "10,x"], "must be comma-separated integers"),
        (["--num-steps", "0"], "--num-steps=[0]: need one or more integers in [1, 1000]"),
        (["--num-samples", "0"], "--num-samples=0 must be >= 1"),
    ],
)
def test_bad_input_exits_with_a_message(toy_run, tmp_path, capsys, args, message):
    argv = ["--checkpoint", str(toy_run), "--output-dir", str(tmp_path / "e"), *args]
    try:
        code = evaluate.main(argv)
    except SystemExit as exc:  # argparse rejects what its type= check refuses: exit status 2 as well
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_missing_or_empty_checkpoint(tmp_path, capsys):
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert evaluate.main(["--checkpoint", str(tmp_path / "run")]) == 2
    assert "run folder without a complete checkpoint" in capsys.readouterr().err
