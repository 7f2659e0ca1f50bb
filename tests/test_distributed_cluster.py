"""Multi-node on one machine: a head and two worker nodes (ray.cluster_utils.Cluster), with a custom resource
`fake_gpu` standing in for GPUs. Rollout workers must land on the worker nodes; removing one worker node
mid-run must not stop the run: its rollout actor restarts on the other node, lost batches are re-run, and
every planned epoch is done once. Slow (three nodes and a run: about 1-2 minutes on a quiet 2-core machine,
6 under load)."""

from __future__ import annotations

import os
import socket

import pytest
import ray
from ray.cluster_utils import Cluster

from scoreaction.config import build_config
from scoreaction.distributed.driver import ActorsStarted, run_distributed
from scoreaction.reporter import EpochDone

EPOCHS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    os.environ.pop("RAY_ADDRESS", None)
    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 3,
            "resources": {"head": 10},
            "gcs_server_port": _free_port(),
            "include_dashboard": False,
            "dashboard_agent_listen_port": _free_port(),
        },
    )
    workers = [c.add_node(num_cpus=2, resources={"fake_gpu": 2}) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="ERROR")
    yield c, workers
    ray.shutdown()
    c.shutdown()


@pytest.mark.slow
def test_rollout_workers_on_gpu_nodes_and_a_node_removed_mid_run(cluster, tmp_path):
    c, workers = cluster
    worker_ids = {w.node_id for w in workers}
    cfg = build_config(
        "toy-gmm",
        overrides=[
            f"run.epochs={EPOCHS}",
            "run.num_samples=256",
            "run.checkpoint_every=3",
            "sampler.batch_size=64",
            "algorithm.micro_batch_size=64",
            "resources.num_rollout_workers=2",
            "resources.rollout_resources={fake_gpu: 1}",
            "resources.reward_resources={head: 1}",
            "resources.learner_resources={head: 1}",
            f"run.storage_path={tmp_path / 'shared'}",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    placement: dict = {}
    removed: list[str] = []

    def on_event(event) -> None:
        if isinstance(event, ActorsStarted):  # where the rollout and reward actors came up
            placement.update({k: [i["node_id"] for i in v] for k, v in event.info.items()})
        # after epoch 2, take away the node of rollout worker 0
        if isinstance(event, EpochDone) and event.metrics["epoch"] >= 2 and not removed:
            victim = next(w for w in workers if w.node_id == placement["rollout"][0])
            c.remove_node(victim)
            removed.append(victim.node_id)

    summary = run_distributed(cfg, tmp_path / "run", threads=1, on_event=on_event, progress_bar=False)
    assert set(placement["rollout"]) <= worker_ids, (placement, worker_ids)
    assert len(set(placement["rollout"])) == 2  # spread: one per GPU node
    assert not set(placement["reward"]) & worker_ids
    assert removed, "the node was never removed: the run ended first"
    assert [m["epoch"] for m in summary["per_epoch"]] == list(range(EPOCHS))
    assert summary["samples"] == 256 * EPOCHS
    assert summary["distributed"]["checkpoint"].startswith(str(tmp_path / "shared"))
    assert summary["distributed"]["checkpoint"].endswith(f"step_{EPOCHS:06d}")
