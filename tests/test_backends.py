"""One epoch loop, two backends: the same config run in this process (``Trainer``) and on Ray
(``run_distributed``, 1 and 2 data-parallel learner ranks) logs the same metric keys every epoch, monitors
included, and the same numbers; every configuration the README offers runs through the Ray path and
resumes there; a killed single-process run resumes to the weights of an uninterrupted one.

One local Ray for the module. Runs are tiny: toy-gmm (64 samples, 4 steps) and the tiny SD preset (8 samples
of 16 px, 2 steps).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file

from scoreaction.config import build_config
from scoreaction.distributed.driver import run_distributed
from scoreaction.faults import ENV_FAULTS, ENV_MARKERS
from scoreaction.reporter import EpochDone, FinalDone
from scoreaction.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

TOY = [
    "run.epochs=3",
    "run.num_samples=64",
    "sampler.num_steps=4",
    "sampler.batch_size=32",
    "algorithm.micro_batch_size=32",
    "value.updates_per_epoch=2",
    "value.pretrain_epochs=1",
    "run.eval_num_steps=[2, 8]",
    "resources.num_rollout_workers=1",
    "resources.num_reward_workers=1",
]
EVAL_KEYS = {f"eval/steps_{n}/{k}" for n in (2, 8) for k in ("reward_mean", "kl_continuous")}
TINY = [
    "run.epochs=2",
    "run.num_samples=8",
    "sampler.num_steps=2",
    "sampler.batch_size=4",
    "algorithm.micro_batch_size=4",
    "value.pretrain_epochs=1",
    "value.updates_per_epoch=1",
    "reward.monitor=[jpeg_incompressibility]",
    "resources.num_rollout_workers=1",
    "resources.num_reward_workers=1",
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _cfg(preset: str, out: Path, *overrides: str, tiny_dir=None):
    base = TOY if preset == "toy-gmm" else [*TINY, f"model.name_or_path={tiny_dir}"]
    return build_config(preset, overrides=[*base, *overrides, f"run.output_dir={out}"])


def _in_process(cfg, out: Path, resume: bool = False) -> tuple[list[dict], dict]:
    """One torch thread, as the Ray actors here (threads=1): the same kernels give the same bits, which a
    discrete reward (JPEG bytes) needs to score the same images the same."""
    epochs: list[dict] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = Trainer(cfg, out).fit(epochs.append, resume=resume)
    finally:
        torch.set_num_threads(threads)
    return epochs, summary


def _on_ray(cfg, out: Path, resume: bool = False) -> tuple[list[dict], dict, dict]:
    events: list = []
    summary = run_distributed(cfg, out, resume=resume, threads=1, on_event=events.append, progress_bar=False)
    epochs = [e.metrics for e in events if isinstance(e, EpochDone)]
    (final,) = [e.final for e in events if isinstance(e, FinalDone)]
    return epochs, summary, final


def _numbers(m: dict) -> dict[str, float]:
    """The numbers both backends must agree on: everything but wall-clock timings."""
    return {k: v for k, v in m.items() if not k.startswith("perf/")}


def _assert_same_numbers(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and math.isnan(a[k]):
            assert math.isnan(b[k]), k
        else:
            assert b[k] == pytest.approx(a[k], rel=rtol, abs=1e-6), k


def _policy_file(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    path = Path(checkpoint)
    name = (
        "toy_policy.safetensors"
        if (path / "toy_policy.safetensors").exists()
        else "pytorch_lora_weights.safetensors"
    )
    return load_file(str(path / name))


# --------------------------------------------------------------------------------------------------
# The same numbers on both backends
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("learners", [1, 2])
def test_toy_runs_log_the_same_metrics_in_process_and_on_ray(tmp_path, learners):
    cfg = _cfg("toy-gmm", tmp_path / "x", f"resources.num_learner_workers={learners}")
    local, local_summary = _in_process(cfg, tmp_path / "local")
    remote, remote_summary, final = _on_ray(cfg, tmp_path / "ray")
    assert [m["epoch"] for m in local] == [m["epoch"] for m in remote] == [0, 1, 2]
    assert [set(m) for m in local] == [set(m) for m in remote]  # the same keys, perf/* included
    # one learner: the same floating-point operations; two: the gradient all-reduce sums in another order
    rtol = 1e-6 if learners == 1 else 1e-4
    for a, b in zip(local, remote, strict=True):
        _assert_same_numbers(_numbers(a), _numbers(b), rtol)
    _assert_same_numbers(local_summary["final"], final, rtol)
    assert [set(m) for m in local_summary["per_epoch"]] == [set(m) for m in remote_summary["per_epoch"]]
    # the per-epoch evaluation at other step counts: in summary.json and TensorBoard, on both backends
    for out, summary in (("local", local_summary), ("ray", remote_summary)):
        assert all(EVAL_KEYS <= set(m) for m in summary["per_epoch"]), out
        assert EVAL_KEYS <= _tensorboard_tags(tmp_path / out), out


def _tensorboard_tags(out: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_tiny_runs_with_a_monitor_log_the_same_metrics_in_process_and_on_ray(tmp_path, tiny_dir):
    """An image preset, with a monitor: monitor/<name>_mean every epoch and in the final evaluation, in
    both backends, with the same numbers."""
    cfg = _cfg("tiny", tmp_path / "x", tiny_dir=tiny_dir)
    local, local_summary = _in_process(cfg, tmp_path / "local")
    remote, remote_summary, final = _on_ray(cfg, tmp_path / "ray")
    key = "monitor/jpeg_incompressibility_mean"
    for m in [*local, *remote, local_summary["final"], final, *remote_summary["per_epoch"]]:
        assert math.isfinite(m[key])
    assert [set(m) for m in local] == [set(m) for m in remote]
    for a, b in zip(local, remote, strict=True):
        _assert_same_numbers(_numbers(a), _numbers(b), 1e-5)
    _assert_same_numbers(local_summary["final"], final, 1e-5)
    for out in ("local", "ray"):  # one reporter: the same files
        assert (tmp_path / out / "reward_curve.png").is_file()
        assert (tmp_path / out / "samples" / "grid_final.png").is_file()
        assert list((tmp_path / out / "tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------------------------------------
# Every configuration the README offers, on Ray, then resumed there
# --------------------------------------------------------------------------------------------------

README_CONFIGS = {
    "ddpo": ["algorithm.name=ddpo", "algorithm.stat_min_count=1"],
    "value_gradient": ["algorithm.name=ctrl", "algorithm.estimator=value_gradient"],
    "weights_running": [
        "reward.weights={jpeg_compressibility: 1.0, jpeg_incompressibility: 0.5}",
        "reward.normalize=running",
    ],
}


def _run_then_resume(cfg, out: Path) -> dict:
    """2 epochs on Ray, then --resume to 3 from the checkpoint of epoch 2."""
    _, first, _ = _on_ray(cfg, out)
    assert [m["epoch"] for m in first["per_epoch"]] == [0, 1]
    more = cfg.model_copy(deep=True)
    more.run.epochs = 3
    epochs, summary, final = _on_ray(more, out, resume=True)
    assert [m["epoch"] for m in epochs] == [2]  # only the new epoch ran
    assert summary["distributed"]["learner_starts_at_epoch"] == [2]
    assert [m["epoch"] for m in summary["per_epoch"]] == [0, 1, 2]
    assert summary["per_epoch"][:2] == first["per_epoch"]  # the history came back with the checkpoint
    assert math.isfinite(final["reward_mean"])
    return summary


@pytest.mark.slow  # six tiny Ray runs: about 2 min a configuration on 2 loaded cores
@pytest.mark.parametrize("name", list(README_CONFIGS))
def test_readme_configurations_run_and_resume_on_ray(tmp_path, tiny_dir, name):
    cfg = _cfg("tiny", tmp_path / "run", *README_CONFIGS[name], tiny_dir=tiny_dir)
    summary = _run_then_resume(cfg, tmp_path / "run")
    assert summary["algorithm"] == cfg.algorithm.name and summary["estimator"] == cfg.algorithm.estimator
    assert all(math.isfinite(m["monitor/jpeg_incompressibility_mean"]) for m in summary["per_epoch"])


def test_a_reward_service_scores_a_ray_run_and_its_resume(tmp_path, tiny_dir):
    """reward.service: every rollout batch of both runs is scored by the service (the reward actors call
    it), and the numbers are those of the in-process reward."""
    from test_rewards_service_faults import FlakyRewardServer

    with FlakyRewardServer() as srv:
        cfg = _cfg(
            "tiny",
            tmp_path / "run",
            "reward.name=jpeg_incompressibility",  # the reward the service serves
            f"reward.service={srv.url}",
            tiny_dir=tiny_dir,
        )
        summary = _run_then_resume(cfg, tmp_path / "run")
        # 2 rollout batches per rollout, each scored in two calls (the reward and the monitor, both served
        # here), and one more call for its x0_hat priors (8 states) except in the final evaluation: the first
        # run's value pre-training, 2 epochs and evaluation (8 batches, 6 with priors), then the resumed run's
        # epoch and evaluation (4 batches, 2 with priors)
        assert srv.actions("/score").count("ok") == (8 * 2 + 6) + (4 * 2 + 2)
    local_cfg = _cfg("tiny", tmp_path / "local", "reward.name=jpeg_incompressibility", tiny_dir=tiny_dir)
    _, local = _in_process(local_cfg, tmp_path / "local")
    for a, b in zip(summary["per_epoch"][:2], local["per_epoch"], strict=True):
        assert a["rollout/reward_mean"] == pytest.approx(b["rollout/reward_mean"], rel=1e-5)


# --------------------------------------------------------------------------------------------------
# A killed single-process run resumes to the same weights
# --------------------------------------------------------------------------------------------------


def test_single_process_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    """jobs/finetune.py --single-process is kill -9'ed in epoch 2 (after the checkpoint of epoch 1);
    --single-process --resume ends with exactly the weights of a run that was never stopped."""
    sets = [a for o in [*TOY, "run.checkpoint_every=1"] for a in ("--set", o)]
    cmd = [sys.executable, "jobs/finetune.py", "--preset", "toy-gmm", "--single-process", *sets]
    env = {**os.environ, ENV_FAULTS: "learner:2", ENV_MARKERS: str(tmp_path / "markers")}
    (tmp_path / "markers").mkdir()
    out = tmp_path / "killed"
    killed = subprocess.run(
        [*cmd, "--output-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    resumed = subprocess.run(
        [*cmd, "--output-dir", str(out), "--resume"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    clean = tmp_path / "clean"
    cfg = build_config("toy-gmm", overrides=[*TOY, "run.checkpoint_every=1", f"run.output_dir={clean}"])
    Trainer(cfg, clean).fit()
    a = _policy_file(out / "checkpoints" / "step_000003")
    b = _policy_file(clean / "checkpoints" / "step_000003")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((out / "summary.json").read_text())
    assert [m["epoch"] for m in summary["per_epoch"]] == [0, 1, 2]  # epochs 0-1 from the checkpoint
