"""The distributed path on a local Ray: exact resume, and fault injection (learner, rollout, reward) that
must end with the planned epochs, none lost or counted twice, and the very parameters of a clean run.

Every run here is toy-gmm (epochs take milliseconds; a run's cost is starting the actors and Ray Train),
with 2 rollout workers, 4 rollout batches per epoch and 2 data-parallel learner workers. Rollout noise depends on (seed, epoch, batch) only,
so a re-run batch is the same batch, and a run that lost and re-ran work must match the clean run bit for
bit. The default suite kills a rollout actor, a reward actor and a learner worker in one run; the slow
suite kills each in its own run.
"""

from __future__ import annotations

import os

import pytest
import ray
import torch
from safetensors.torch import load_file

from scoreaction.config import build_config
from scoreaction.distributed.driver import run_distributed
from scoreaction.distributed.faults import Fault, FaultPlan
from scoreaction.distributed.resume import ResumeError, latest_step_dir

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
    on_event = (lambda kind, payload: events.append((kind, payload))) if events is not None else None
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


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    summary = _run(out)
    _assert_all_epochs_once(summary)
    assert summary["distributed"]["learner_starts_at_epoch"] == [0]
    assert latest_step_dir(out / "checkpoints").name == f"step_{EPOCHS:06d}"
    # the policy moved toward larger x: the toy's reward
    assert (
        summary["per_epoch"][-1]["rollout/reward_mean"] > summary["per_epoch"][0]["rollout/reward_mean"] + 0.2
    )
    return summary


def test_rollout_reward_and_learner_killed_mid_epoch_in_one_run_match_the_clean_run(clean_run, tmp_path):
    (tmp_path / "markers").mkdir()
    faults = FaultPlan(
        (Fault("rollout", epoch=1, index=1), Fault("reward", epoch=2, index=0), Fault("learner", epoch=3)),
        str(tmp_path / "markers"),
    )
    summary = _run(tmp_path / "run", "resources.max_learner_failures=1", faults=faults)
    assert faults.fired() == ["learner-e3-i0", "reward-e2-i0", "rollout-e1-i1"]
    assert summary["distributed"]["learner_starts_at_epoch"] == [0, 2]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))


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


def test_interrupted_then_resumed_run_ends_with_the_same_parameters(clean_run, tmp_path):
    out = tmp_path / "run"
    (tmp_path / "markers").mkdir()
    faults = FaultPlan((Fault("learner", epoch=3, index=0),), str(tmp_path / "markers"))
    with pytest.raises(Exception):  # noqa: B017 - Ray Train's TrainingFailedError after 0 retries
        _run(out, "resources.max_learner_failures=0", faults=faults)
    assert latest_step_dir(out / "checkpoints").name == "step_000002"
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


@pytest.mark.slow
def test_rollout_actor_killed_mid_epoch_is_restarted_and_its_batches_rerun(clean_run, tmp_path):
    (tmp_path / "markers").mkdir()
    faults = FaultPlan((Fault("rollout", epoch=1, index=1),), str(tmp_path / "markers"))
    summary = _run(tmp_path / "run", faults=faults)
    assert faults.fired() == ["rollout-e1-i1"]
    assert summary["distributed"]["learner_starts_at_epoch"] == [0]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))


@pytest.mark.slow
def test_reward_actor_killed_mid_epoch_is_restarted_and_its_batch_rescored(clean_run, tmp_path):
    (tmp_path / "markers").mkdir()
    faults = FaultPlan((Fault("reward", epoch=2, index=0),), str(tmp_path / "markers"))
    summary = _run(tmp_path / "run", faults=faults)
    assert faults.fired() == ["reward-e2-i0"]
    _assert_all_epochs_once(summary)
    _assert_same_params(_params(summary), _params(clean_run))
