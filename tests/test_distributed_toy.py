"""The toy-gmm acceptance of the CTRL issue (tests/test_toy_ctrl.py's reduced bounds) through the distributed
path: 2 rollout workers, the rewards on a reward actor, one learner worker (the data-parallel learner is
covered by tests/test_distributed.py, bit for bit across restarts). Slow."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import ray
from test_toy_ctrl import evaluate_against_optimum

from scoreaction.checkpoint import load_checkpoint
from scoreaction.config import build_config
from scoreaction.distributed.driver import run_distributed
from scoreaction.trainer import build_policy


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ctrl_on_toy_gmm_through_rollout_and_reward_actors(tmp_path):
    cfg = build_config(
        "toy-gmm",
        overrides=[
            "run.epochs=30",
            "algorithm.micro_batch_size=256",
            "algorithm.learning_rate=3e-3",
            "sampler.batch_size=1024",
            "resources.num_rollout_workers=2",
            "resources.num_learner_workers=1",
            f"run.output_dir={tmp_path}",
        ],
    )
    summary = run_distributed(cfg, tmp_path, threads=1, progress_bar=False)
    assert [m["epoch"] for m in summary["per_epoch"]] == list(range(30))
    policy = build_policy(cfg)
    load_checkpoint(policy, summary["distributed"]["checkpoint"])
    m = evaluate_against_optimum(SimpleNamespace(cfg=cfg, policy=policy), 40)
    print(f"\ndistributed toy CTRL at 40 steps: {m}")
    assert m["weight_err"] <= 0.10 and m["mean_err"] <= 0.15
    assert 0.80 <= m["gap_closed"] <= 1.15
    assert m["kl_rel_err"] <= 0.30
