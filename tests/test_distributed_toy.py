"""The toy-gmm acceptance of the CTRL issue through the distributed path: 2 rollout workers, the rewards on
a reward actor, 2 data-parallel learner workers (advantages normalised over the whole batch, gradients
all-reduced). The default suite runs tests/test_toy_ctrl.py's reduced run and bounds; the full run and bounds
(J >= 0.93 J* included) are `slow`."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import ray
from test_toy_ctrl import FULL, REDUCED, assert_full_bounds, assert_reduced_bounds, evaluate_against_optimum

from scoreaction.builders import build_policy
from scoreaction.checkpoint import load_checkpoint
from scoreaction.config import build_config
from scoreaction.distributed.driver import run_distributed


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _train_distributed(tmp_path, overrides: list[str]) -> dict[str, float]:
    cfg = build_config(
        "toy-gmm",
        overrides=[
            *overrides,
            "sampler.batch_size=1024",
            "resources.num_rollout_workers=2",
            "resources.num_learner_workers=2",
            f"run.output_dir={tmp_path}",
        ],
    )
    summary = run_distributed(cfg, tmp_path, threads=1, progress_bar=False)
    assert [m["epoch"] for m in summary["per_epoch"]] == list(range(cfg.run.epochs))
    policy = build_policy(cfg)
    load_checkpoint(policy, summary["distributed"]["checkpoint"])
    return evaluate_against_optimum(SimpleNamespace(cfg=cfg, policy=policy), 40)


@pytest.mark.slow  # minutes on 2 cores: the default suite must stay under 15 min
def test_reduced_toy_acceptance_through_rollout_reward_and_learner_workers(tmp_path):
    m = _train_distributed(tmp_path, REDUCED)
    print(f"\ndistributed toy CTRL (reduced) at 40 steps: {m}")
    assert_reduced_bounds(m)


@pytest.mark.slow
def test_full_toy_acceptance_through_rollout_reward_and_learner_workers(tmp_path):
    m = _train_distributed(tmp_path, FULL)
    print(f"\ndistributed toy CTRL (full) at 40 steps: {m}")
    assert_full_bounds(m)
