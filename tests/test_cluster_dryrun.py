"""The RayJob's fine-tuning run places every actor on a Ray cluster of the manifest's shape, simulated on this
machine: `ray.cluster_utils.Cluster` with a head of the manifest's num-cpus and one node per worker replica
with the pod's CPU and GPU limits (KubeRay passes a container's nvidia.com/gpu limit to `ray start --num-gpus`;
Ray accepts logical GPUs on a machine without any, so the nodes advertise "GPU" exactly as the real pods do).

Two checks: `jobs/finetune.py <the manifest's entrypoint args> --dry-run` against that cluster (RAY_ADDRESS set
to it and nothing else) reports that the plan fits, with no actor on the head; and Ray's own scheduler reserves
every actor's resources at once (placement groups: rollout and reward workers spread, learner workers packed,
as the driver asks for them), which proves a placement exists beyond the plan's first-fit arithmetic.
About 30-40 s on 2 cores (five simulated nodes and one job start).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

ROOT = Path(__file__).resolve().parents[1]
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob-finetune.yaml"


def quantity(value: str | int) -> float:
    s = str(value)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def manifest_shape() -> tuple[dict, list[dict]]:
    """Ray start arguments of the head and of every worker pod the RayJob starts with (`replicas`)."""
    spec = yaml.safe_load(RAYJOB.read_text())["spec"]["rayClusterSpec"]
    head = {"num_cpus": int(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]), "num_gpus": 0}
    workers = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        node = {
            "num_cpus": int(params.get("num-cpus", quantity(limits["cpu"]))),
            "num_gpus": int(params.get("num-gpus", quantity(limits.get("nvidia.com/gpu", 0)))),
        }
        workers += [node] * group["replicas"]
    return head, workers


@pytest.fixture(scope="module")
def simulated_cluster():
    """Our own Ray cluster (never someone else's: RAY_ADDRESS is dropped), shut down at the end."""
    saved = os.environ.pop("RAY_ADDRESS", None)
    if ray.is_initialized():
        ray.shutdown()
    head, workers = manifest_shape()
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for node in workers:
            cluster.add_node(wait=False, **node)  # start them together, then wait once
        cluster.wait_for_nodes()
        yield cluster, head, workers
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def test_manifest_shape_is_what_the_plan_needs():
    head, workers = manifest_shape()
    # head num-cpus "0"; 4 pods with 8 CPUs and 1 GPU each (hand-read from the manifest)
    assert head == {"num_cpus": 0, "num_gpus": 0}
    assert workers == [{"num_cpus": 8, "num_gpus": 1}] * 4


def test_dry_run_of_the_rayjob_entrypoint_fits_the_simulated_cluster(simulated_cluster):
    cluster, _, workers = simulated_cluster
    argv = shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])
    # jobs/finetune.py through the RayJob's entrypoint wrapper (which adds --resume on a retry)
    assert argv[:2] == ["python", "cluster/kuberay/finetune_or_resume.py"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ADDRESS=cluster.address, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, *argv[1:], "--dry-run"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"RAY_ADDRESS={cluster.address}" in out
    assert f"{1 + len(workers)} node(s)" in out
    assert "fits: yes" in out and "DOES NOT FIT" not in out
    # every actor of the plan has a node: 4 rollout + 4 reward + 4 learner workers, none on the head
    placement = next(line for line in out.splitlines() if line.startswith("expected placement"))
    placed = re.findall(
        r"(RolloutWorker|RewardWorker|Learner \(Ray Train worker\)) #(\d+) -> (\w+)", placement
    )
    assert sorted((name, int(i)) for name, i, _ in placed) == sorted(
        (name, i)
        for name in ("RolloutWorker", "RewardWorker", "Learner (Ray Train worker)")
        for i in range(4)
    )
    head_id = cluster.head_node.node_id[:12]
    assert all(node != head_id for _, _, node in placed), placement


def test_ray_reserves_every_actor_of_the_plan_at_once(simulated_cluster):
    """Ray's scheduler, not only the plan's arithmetic: all bundles ready together, none on the head."""
    from jobs.finetune import parse_args
    from scoreaction.config import build_config
    from scoreaction.distributed.plan import build_plan

    cluster, _, _ = simulated_cluster
    args = parse_args(shlex.split(yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"])[2:])
    cfg = build_config(
        args.preset, ROOT / args.config, [*args.overrides, f"run.output_dir={args.output_dir}"]
    )
    ray.init(address=cluster.address, logging_level="WARNING")
    groups = [g for g in build_plan(cfg).groups if g.demand()]
    strategy = {"rollout": "SPREAD", "reward": "SPREAD", "learner": "PACK"}
    pgs = [
        placement_group([g.demand()] * g.count, strategy=strategy[g.field_prefix], name=g.field_prefix)
        for g in groups
    ]
    try:
        ray.get([pg.ready() for pg in pgs], timeout=120)
        head_id = cluster.head_node.node_id
        for g, pg in zip(groups, pgs, strict=True):
            nodes = placement_group_table(pg)["bundles_to_node_id"].values()
            assert len(nodes) == g.count and head_id not in nodes, g.name
        # and the plan uses every GPU of the shape: 4 x (0.4 + 0.2 + 0.4) = 4 (the cluster's total, which,
        # unlike ray.available_resources(), does not lag behind the reservations)
        assert build_plan(cfg).total()["GPU"] == pytest.approx(ray.cluster_resources()["GPU"])
    finally:
        for pg in pgs:
            remove_placement_group(pg)
        ray.shutdown()
