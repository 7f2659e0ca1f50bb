"""The main job's command line: the single-process reference run end to end, --dry-run, and bad input that
must fail clearly before anything starts or is overwritten. (The distributed run through the CLI is tested
end to end with `ray job submit` in test_distributed_job.py.)"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import finetune  # noqa: E402

SMALL = [
    "--set",
    "run.num_samples=4",
    "--set",
    "sampler.num_steps=3",
    "--set",
    "run.epochs=2",
    "--set",
    "algorithm.micro_batch_size=2",
]


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("jobs") / "run"
    assert finetune.main(["--single-process", "--output-dir", str(out), *SMALL]) == 0
    return out


def test_single_process_writes_grid_curve_checkpoint_and_summary(single_process_run):
    out = single_process_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "ctrl" and summary["samples"] == 8 and len(summary["per_epoch"]) == 2
    assert set(summary["final"]) >= {"reward_mean", "kl_mean", "objective"}
    assert (out / "samples" / "grid_final.png").stat().st_size > 0
    assert (out / "reward_curve.png").stat().st_size > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert (out / "checkpoints" / "step_000002" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("mode", [["--single-process"], [], ["--resume", "--set", "algorithm.kl_coef=0.5"]])
def test_a_folder_holding_another_runs_checkpoints_is_refused_untouched(single_process_run, capsys, mode):
    out = single_process_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert finetune.main([*mode, "--output-dir", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    if "--resume" in mode:  # both backends write the same training checkpoints: a changed config is refused
        assert "the config differs" in err and "algorithm.kl_coef" in err
    else:
        assert "already holds a run's checkpoints" in err and "Nothing was overwritten" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not ray.is_initialized()


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert finetune.main(["--resume", "--output-dir", str(tmp_path / "none"), *SMALL]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_dry_run_prints_the_plan_and_starts_nothing(tmp_path, capsys):
    args = ["--dry-run", "--output-dir", str(tmp_path / "r"), "--set", "resources.num_rollout_workers=2"]
    assert finetune.main(args) == 0
    text = capsys.readouterr().out
    assert "RolloutWorker                      2" in text and "Learner (Ray Train worker)" in text
    assert "fits: yes" in text and "backend gloo" in text
    assert str(tmp_path / "r" / "checkpoints") in text
    assert not (tmp_path / "r").exists() and not ray.is_initialized()


@pytest.mark.parametrize("dry", [True, False])
def test_more_gpus_than_the_machine_has_fails_at_once(tmp_path, capsys, dry):
    import torch

    gpus = torch.cuda.device_count() + 1
    args = [*(["--dry-run"] if dry else []), "--output-dir", str(tmp_path / "r"), *SMALL]
    assert finetune.main([*args, "--set", f"resources.rollout_gpus={gpus}"]) == 2
    captured = capsys.readouterr()
    assert f"resources.rollout_gpus={gpus} x resources.num_rollout_workers=1" in captured.err
    assert f"the cluster has {gpus - 1} GPU" in captured.err
    if dry:
        assert "DOES NOT FIT" in captured.out
    assert not (tmp_path / "r").exists() and not ray.is_initialized()


@pytest.mark.parametrize("dry", [True, False])
def test_unreachable_ray_address_is_a_clear_error(tmp_path, capsys, monkeypatch, dry):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    args = [*(["--dry-run"] if dry else []), "--output-dir", str(tmp_path / "r"), *SMALL]
    assert finetune.main(args) == 2
    assert "no Ray cluster is reachable there" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not ray.is_initialized()


def test_dashboard_url_as_ray_address_explains_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert finetune.main(["--output-dir", str(tmp_path / "r"), *SMALL]) == 2
    assert "is a dashboard (job API) address" in capsys.readouterr().err


def test_learner_split_must_divide_the_batch(tmp_path, capsys):
    args = ["--output-dir", str(tmp_path / "r"), *SMALL, "--set", "resources.num_learner_workers=3"]
    assert finetune.main(args) == 2
    assert "run.num_samples=4 must be divisible by resources.num_learner_workers=3" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "sd99"], "allowed presets: tiny, toy-gmm, sd15, sd15-random"),
        (["--set", "sampler.num_steps=0"], "sampler.num_steps=0: Input should be greater than or equal to 1"),
        (["--set", "sampler.eta=2"], "sampler.eta=2: Input should be less than or equal to 1"),
        (
            ["--set", "resources.placement=pack"],
            "resources.placement='pack': Input should be 'spread' or 'default'",
        ),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    assert finetune.main([*args, "--output-dir", str(tmp_path / "r")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("single", [False, True], ids=["distributed", "single-process"])
@pytest.mark.parametrize("name", ["run #2", "null", "yes", "[a]", "123", "a: b"])
def test_output_dir_is_a_path_never_yaml(tmp_path, monkeypatch, name, single):
    """--output-dir is taken literally ("/data/run #2" is not "/data/run"); --set values stay YAML."""
    seen = {}

    def fake_run(cfg, out, *args):
        seen.update(cfg=cfg, out=out)
        return {
            "algorithm": "ctrl",
            "preset": "tiny",
            "epochs": 0,
            "samples": 0,
            "final": {"reward_mean": 0.0, "kl_mean": 0.0, "objective": 0.0},
        }

    monkeypatch.setattr(finetune, "run_single_process" if single else "run", fake_run)
    out = tmp_path / name
    args = [
        "--output-dir",
        str(out),
        "--set",
        "run.prompts=[a cat, a dog]",
        "--set",
        "algorithm.kl_coef=1e-3",
    ]
    assert finetune.main([*args, *(["--single-process"] if single else [])]) == 0
    assert seen["cfg"].run.output_dir == str(out) and seen["out"] == out
    assert seen["cfg"].run.prompts == ["a cat", "a dog"] and seen["cfg"].algorithm.kl_coef == 0.001
