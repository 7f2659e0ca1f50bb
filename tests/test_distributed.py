"""The distributed path on a local Ray: exact resume, and fault injection (learner, rollout, reward, a save,
the driver, a NaN reward) that must end with the planned epochs, none lost or counted twice, the very
parameters of a clean run, and a clean run folder (``latest`` complete and finite, no leftovers, no lock).

Every run here is toy-gmm (epochs take milliseconds; a run's cost is starting the actors and Ray Train),
with 2 rollout workers, 4 rollout batches per epoch and 2 data-parallel learner workers. Rollout noise depends on (seed, epoch, batch) only,
so a re-run batch is the same batch, and a run that lost and re-ran work must match the clean run bit for
bit. The default suite kills a rollout actor, a reward actor, a learner worker and the learner mid-save
in one run, and has a reward return NaN (the run stops, --resume continues); the slow suite kills each in
its own run, and kill -9s the driver (jobs/finetune.py) mid-run before resuming.
"""

from __future__ import annotations

import json
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
from scoreaction.faults import ENV_FAULTS, ENV_MARKERS, Fault, FaultPlan
from scoreaction.nonfinite import NonFiniteError
from scoreaction.run_folder import (
    LEFTOVER_MARKERS,
    LOCK_FILE,
    ResumeError,
    latest_step_dir,
    non_finite,
    read_training_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]

EPOCHS = 6
TOY = [
    f"run.epochs={EPOCHS}",
    "run.num_samples=256",
    "run.checkpoint_every=2",
    "sampler.batch_size=64",
    "algorithm.micro_batch_size=64",
    "algorithm.learning_rate=3e-3",
    "resources.num_rollout_workers=2",
    "resources.num_reward_workers=1",
    "resources.num_learner_workers=2",
]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _run(out, *extra, faults=None, resume=False, events=None):
    cfg = build_config("toy-gmm", overrides=[*TOY, *extra, f"run.output_dir={out}"])
    on_event = events.append if events is not None else None
    return run_distributed(
        cfg, out, resume=resume, threads=1, faults=faults, on_event=on_event, progress_bar=False
    )


def _params(summary) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(summary["distributed"]["checkpoint"], "toy_policy.safetensors"))


def _assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_all_epochs_once(summary):
    assert [m["epoch"] for m in summary["per_epoch"]] == list(range(EPOCHS))
    assert [m["samples"] for m in summary["per_epoch"]] == [256 * (e + 1) for e in range(EPOCHS)]
    assert summary["samples"] == 256 * EPOCHS


def _assert_run_folder(out, step=EPOCHS):
    """``latest`` names a complete, finite step_<step>; no leftovers of killed saves; the lock released."""
    ckpt = Path(out) / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step_{step:06d}"
    latest = latest_step_dir(ckpt)
    assert latest == ckpt / f"step_{step:06d}"
    state, progress = read_training_checkpoint(latest)
    assert progress["epoch"] == step and [h["epoch"] for h in progress["history"]] == list(range(step))
    tensors = {
        **load_file(str(latest / "toy_policy.safetensors")),
        **load_file(str(latest / "learner_state.safetensors")),
    }
    assert non_finite(tensors) == []
    assert [p.name for p in ckpt.iterdir() if any(m in p.name for m in LEFTOVER_MARKERS)] == []
    assert not (Path(out) / LOCK_FILE).exists()


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    summary = _run(out)
    _assert_all_epochs_once(summary)
    assert summary["distributed"]["learner_starts_at_epoch"] == [0]
    _assert_run_folder(out)
    # the policy moved toward larger x: the toy's reward
    assert (
        summary["per_epoch"][-1]["rollout/reward_mean"] > summary["per_epoch"][0]["rollout/reward_mean"] + 0.2
    )
    return summary


@pytest.mark.slow  # minutes on 2 cores: the default suite must stay under 15 min
def test_rollout_reward_learner_and_a_save_killed_in_one_run_match_the_clean_run(clean_run, tmp_path):
    (tmp_path / "markers").mkdir()
    faults = FaultPlan(
        (
            Fault("rollout", epoch=1, index=1),
            Fault("reward", epoch=2, index=0),
            Fault("learner", epoch=3),
            Fault("save", epoch=4),  # rank 0 killed while writing step_000004, before it is renamed in
        ),
        str(tmp_path / "markers"),
    )
    summary = _run(tmp_path / "run", "resources.max_learner_failures=2", faults=faults)
    assert faults.fired() == ["learner-e3-i0", "reward-e2-i0", "rollout-e1-i1", "save-e4-i0"]
    # the learner restarted from step_000002 after the kill in epoch 3, and again after the killed save
    assert summary["distributed"]["learner_starts_at_epoch"] == [0, 2, 2]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
    _assert_run_folder(tmp_path / "run")


@pytest.mark.slow
def test_learner_killed_mid_epoch_restarts_from_checkpoint_and_matches_the_clean_run(clean_run, tmp_path):
    faults = FaultPlan((Fault("learner", epoch=3, index=0),), str(tmp_path / "markers"))
    (tmp_path / "markers").mkdir()
    summary = _run(tmp_path / "run", "resources.max_learner_failures=1", faults=faults)
    assert faults.fired() == ["learner-e3-i0"]
    # restarted from step_000002 (or step_000003 is not written: checkpoint_every=2), re-ran epoch 2 and 3
    assert summary["distributed"]["learner_starts_at_epoch"] == [0, 2]
    assert summary["distributed"]["redone_epochs"] == [2]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
    # the same rollouts, epoch by epoch
    assert [m["rollout/reward_mean"] for m in summary["per_epoch"]] == [
        m["rollout/reward_mean"] for m in clean_run["per_epoch"]
    ]
    _assert_run_folder(tmp_path / "run")


@pytest.mark.slow  # minutes on 2 cores: the default suite must stay under 15 min
def test_a_nan_reward_stops_the_run_and_resume_continues_from_the_last_good_checkpoint(clean_run, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "markers").mkdir()
    faults = FaultPlan((Fault("nan_reward", epoch=3, index=0),), str(tmp_path / "markers"))
    with pytest.raises(NonFiniteError, match="epoch 3") as info:
        _run(out, "resources.max_learner_failures=2", faults=faults)
    assert info.value.kind == "reward" and info.value.count > 0
    _assert_run_folder(out, step=2)  # stopped at once (no retry), nothing written after the last good one
    # without --resume the folder is refused, and nothing is touched
    with pytest.raises(ResumeError, match="already holds a run's checkpoints"):
        _run(out)
    # a different learning rate is another run, not a resume
    with pytest.raises(ResumeError, match="algorithm.learning_rate"):
        _run(out, "algorithm.learning_rate=1e-2", resume=True)
    summary = _run(out, resume=True)
    assert summary["distributed"]["learner_starts_at_epoch"] == [2]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
    _assert_run_folder(out)


@pytest.mark.slow
def test_learner_failures_exhausted_then_resumed_run_ends_with_the_same_parameters(clean_run, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "markers").mkdir()
    faults = FaultPlan((Fault("learner", epoch=3, index=0),), str(tmp_path / "markers"))
    with pytest.raises(ray.train.TrainingFailedError):  # no retry left after the kill
        _run(out, "resources.max_learner_failures=0", faults=faults)
    assert latest_step_dir(out / "checkpoints").name == "step_000002"
    summary = _run(out, resume=True)
    assert summary["distributed"]["learner_starts_at_epoch"] == [2]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
    _assert_run_folder(out)


@pytest.mark.slow
def test_driver_killed_mid_run_then_resumed_matches_the_clean_run(clean_run, tmp_path):
    """kill -9 of jobs/finetune.py (the driver, with its own local Ray) after epoch 3: the lock it leaves names
    a dead pid and is taken over by the resumed run, which ends as the clean run does."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({ENV_FAULTS: "driver:3", ENV_MARKERS: str(tmp_path / "markers")})
    sets = [a for o in [*TOY, "resources.torch_threads=1"] for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "jobs/finetune.py", "--preset", "toy-gmm", *sets, "--output-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    lock = json.loads((out / LOCK_FILE).read_text())  # left by the killed driver
    assert latest_step_dir(out / "checkpoints") is not None
    summary = _run(out, resume=True)
    assert summary["distributed"]["learner_starts_at_epoch"][0] >= 2
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
    _assert_run_folder(out)
    assert lock["pid"] != os.getpid() and lock["run_id"]  # the killed driver's, taken over by the resume


@pytest.mark.slow
def test_rollout_actor_killed_mid_epoch_is_restarted_and_its_batches_rerun(clean_run, tmp_path):
    (tmp_path / "markers").mkdir()
    faults = FaultPlan((Fault("rollout", epoch=1, index=1),), str(tmp_path / "markers"))
    summary = _run(tmp_path / "run", faults=faults)
    assert faults.fired() == ["rollout-e1-i1"]
    assert summary["distributed"]["learner_starts_at_epoch"] == [0]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
    _assert_run_folder(tmp_path / "run")


@pytest.mark.slow
def test_reward_actor_killed_mid_epoch_is_restarted_and_its_batch_rescored(clean_run, tmp_path):
    (tmp_path / "markers").mkdir()
    faults = FaultPlan((Fault("reward", epoch=2, index=0),), str(tmp_path / "markers"))
    summary = _run(tmp_path / "run", faults=faults)
    assert faults.fired() == ["reward-e2-i0"]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
    _assert_run_folder(tmp_path / "run")
