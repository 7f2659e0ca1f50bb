"""The resource plan of a distributed run: which actors, what each asks the cluster for, where they would go.

Pure code (no Ray): the driver feeds it ``ray.nodes()`` (or a description of the local machine), and both
``--dry-run`` and the start of a run use it, so a config that cannot fit fails at once with a message
naming the fields instead of leaving actors pending forever.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from scoreaction.config import Config

EPS = 1e-9


class PlanError(ValueError):
    """The config's resources cannot run on this cluster (or do not fit together)."""


@dataclass(frozen=True)
class ActorGroup:
    """count actors of one kind, each asking for cpus, gpus and custom resources."""

    name: str
    field_prefix: str  # "rollout" -> resources.rollout_cpus, ...
    count: int
    cpus: float
    gpus: float
    custom: dict[str, float] = field(default_factory=dict)
    placement: str = "default"
    on_failure: str = ""

    def demand(self) -> dict[str, float]:
        out = {"CPU": self.cpus, "GPU": self.gpus, **self.custom}
        return {k: v for k, v in out.items() if v > 0}


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    resources: dict[str, float]


@dataclass
class ResourcePlan:
    groups: list[ActorGroup]

    def total(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for g in self.groups:
            for k, v in g.demand().items():
                out[k] = out.get(k, 0.0) + v * g.count
        return out


def build_plan(cfg: Config) -> ResourcePlan:
    r = cfg.resources
    restarts = "no limit" if r.max_restarts < 0 else str(r.max_restarts)
    strategy = {"spread": "SPREAD", "default": "Ray default"}[r.placement]
    learner_failures = "no limit" if r.max_learner_failures < 0 else str(r.max_learner_failures)
    return ResourcePlan(
        [
            ActorGroup(
                "RolloutWorker",
                "rollout",
                r.num_rollout_workers,
                r.rollout_cpus,
                r.rollout_gpus,
                dict(r.rollout_resources),
                strategy,
                f"max_restarts={restarts}, lost tasks re-run",
            ),
            ActorGroup(
                "RewardWorker",
                "reward",
                r.num_reward_workers,
                r.reward_cpus,
                r.reward_gpus,
                dict(r.reward_resources),
                strategy,
                f"max_restarts={restarts}, lost tasks re-run",
            ),
            ActorGroup(
                "Learner (Ray Train worker)",
                "learner",
                r.num_learner_workers,
                r.learner_cpus,
                r.learner_gpus,
                dict(r.learner_resources),
                "one placement group, PACK",
                f"FailureConfig(max_failures={learner_failures}): restart from the last checkpoint",
            ),
            ActorGroup("EventSink + TrainController", "", 1, 0.0, 0.0, {}, "driver's node / anywhere", "-"),
        ]
    )


def validate_layout(cfg: Config) -> None:
    """Checks of the learner's backend that do not depend on the cluster (the data-parallel split itself is
    checked when the config is built: scoreaction/config/schema.py)."""
    r, w = cfg.resources, cfg.resources.num_learner_workers
    if r.backend == "nccl" and r.learner_gpus <= 0:
        raise PlanError(
            "resources.backend='nccl' needs GPUs: resources.learner_gpus=0; use 'gloo' (or 'auto') on CPU"
        )
    if r.backend == "nccl" and w > 1 and r.learner_gpus < 1:
        raise PlanError(
            f"resources.backend='nccl' with resources.learner_gpus={r.learner_gpus} (a shared GPU): NCCL "
            "cannot run two ranks on one device; use 'gloo' or 'auto'"
        )


def learner_backend(cfg: Config) -> str:
    r = cfg.resources
    if r.backend != "auto":
        return r.backend
    return "nccl" if r.learner_gpus >= 1 else "gloo"


def nodes_from_ray(ray_nodes: list[dict]) -> list[NodeInfo]:
    """The alive nodes of ``ray.nodes()``."""
    return [
        NodeInfo(n["NodeID"][:12], n.get("NodeManagerAddress", "?"), dict(n.get("Resources", {})))
        for n in ray_nodes
        if n.get("Alive", n.get("alive", True))
    ]


def local_cpus(plan: ResourcePlan) -> int:
    """Logical CPUs a local Ray declares: every core, or more when the plan asks for more. On one host the
    phases of an epoch mostly run one after another, so reserving more logical CPUs than cores is right."""
    return max(os.cpu_count() or 1, math.ceil(plan.total().get("CPU", 0.0) - EPS))


def local_node(plan: ResourcePlan, gpus: int) -> NodeInfo:
    """The single node a local Ray (started by jobs/finetune.py) would have."""
    return NodeInfo("local", "127.0.0.1", {"CPU": float(local_cpus(plan)), "GPU": float(gpus)})


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU") or v > 0) or "-"


def _cluster_line(nodes: list[NodeInfo]) -> str:
    keep = ("CPU", "GPU")
    per = "; ".join(
        f"{n.node_id} ({n.address}): "
        + _fmt(
            {
                k: v
                for k, v in n.resources.items()
                if k in keep or not (k.startswith("node:") or "memory" in k)
            }
        )
        for n in nodes
    )
    return f"{len(nodes)} node(s): {per}"


def check_fit(plan: ResourcePlan, nodes: list[NodeInfo]) -> list[tuple[str, int, str]]:
    """Place every actor on a node (first fit, largest first) or raise PlanError naming the fields.

    Returns (group name, index, node_id) per actor: the expected placement. Ray's scheduler may choose
    differently; this proves that a placement exists and reports totals the cluster lacks.
    """
    if not nodes:
        raise PlanError("the Ray cluster has no alive nodes")
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in n.resources.items():
            totals[k] = totals.get(k, 0.0) + v
    for key, need in plan.total().items():
        have = totals.get(key, 0.0)
        if need > have + EPS:
            parts = [
                f"resources.{g.field_prefix}_{_field_suffix(key)}={g.demand()[key]:g} x "
                f"resources.num_{g.field_prefix}_workers={g.count}"
                for g in plan.groups
                if key in g.demand() and g.field_prefix
            ]
            raise PlanError(
                f"the config asks for {need:g} {key} in all ({' + '.join(parts)}) but the cluster has "
                f"{have:g} {key} ({_cluster_line(nodes)}). Lower those fields, or add nodes with {key}."
            )
    free = {n.node_id: dict(n.resources) for n in nodes}
    actors = [(g, i) for g in plan.groups for i in range(g.count) if g.demand()]
    # largest first: GPUs, then custom resources, then CPUs
    actors.sort(key=lambda a: (-a[0].gpus, -sum(a[0].custom.values()), -a[0].cpus))
    placed: list[tuple[str, int, str]] = []
    for g, i in actors:
        need = g.demand()
        node = next(
            (nid for nid, res in free.items() if all(res.get(k, 0.0) + EPS >= v for k, v in need.items())),
            None,
        )
        if node is None:
            raise PlanError(
                f"{g.name} #{i} needs {_fmt(need)} on one node (resources.{g.field_prefix}_*), and no node "
                f"has that much left once the other actors are placed ({_cluster_line(nodes)})"
            )
        for k, v in need.items():
            free[node][k] -= v
        placed.append((g.name, i, node))
    return placed


def _field_suffix(key: str) -> str:
    return {"CPU": "cpus", "GPU": "gpus"}.get(key, f"resources[{key!r}]")


def format_plan(
    cfg: Config, plan: ResourcePlan, nodes: list[NodeInfo], cluster: str, checkpoint_dir: str
) -> str:
    """The --dry-run text: actors, resources each, placement, failure handling, and whether it fits."""
    chosen, model = cfg.run.preset, cfg.model.preset
    name = f"{chosen} (model {model})" if chosen is not None and chosen != model else model
    lines = [
        f"resource plan: preset {name}, algorithm {cfg.algorithm.name}, "
        f"{cfg.run.epochs} epochs x {cfg.run.num_samples} samples",
        f"cluster: {cluster}: {_cluster_line(nodes)}",
        "",
        f"  {'actor':30} {'count':>5} {'CPU':>5} {'GPU':>5}  {'custom':16} {'placement':26} on failure",
    ]
    for g in plan.groups:
        custom = ", ".join(f"{k} {v:g}" for k, v in g.custom.items()) or "-"
        lines.append(
            f"  {g.name:30} {g.count:>5} {g.cpus:>5g} {g.gpus:>5g}  {custom:16} {g.placement:26} {g.on_failure}"
        )
    lines.append(f"  total: {_fmt(plan.total())}")
    lines.append(
        f"learner: {cfg.resources.num_learner_workers} worker(s), backend {learner_backend(cfg)}, "
        f"{cfg.run.num_samples // cfg.resources.num_learner_workers} trajectories per worker per epoch"
    )
    chunks = math.ceil(cfg.run.num_samples / cfg.sampler.batch_size)
    lines.append(
        f"rollouts: {chunks} batch(es) of <= {cfg.sampler.batch_size} per epoch over "
        f"{cfg.resources.num_rollout_workers} worker(s); each batch is scored as soon as it lands"
    )
    lines.append(f"checkpoints: {checkpoint_dir} (every {cfg.run.checkpoint_every} epoch(s), atomic)")
    try:
        placed = check_fit(plan, nodes)
    except PlanError as exc:
        lines.append(f"DOES NOT FIT: {exc}")
        return "\n".join(lines)
    lines.append("expected placement (first fit): " + ", ".join(f"{n} #{i} -> {nid}" for n, i, nid in placed))
    lines.append("fits: yes")
    return "\n".join(lines)
