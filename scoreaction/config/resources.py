"""The ``resources`` section of the run configuration: how many Ray actors of each kind, what each one asks
the cluster for, where they go, and how failures are handled. Its own module so that the distributed
layer owns it; the single-process loop ignores it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from scoreaction.config.base import ConfigSection


def _check_custom(kind: str, value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if name in ("CPU", "GPU", "memory"):
            raise ValueError(
                f"resources.{kind}_resources={value!r}: {name!r} has its own field "
                f"({kind}_cpus / {kind}_gpus); this dict holds custom resources only"
            )
        if amount < 0:
            raise ValueError(f"resources.{kind}_resources[{name!r}]={amount!r} must be >= 0")
    return value


class ResourcesConfig(ConfigSection):
    num_rollout_workers: int = Field(1, ge=1, description="RolloutWorker actors (each holds a policy copy).")
    rollout_gpus: float = Field(
        0.0, ge=0, description="GPUs per rollout worker (fractions share a card; 0 on CPU)."
    )
    rollout_cpus: float = Field(1.0, ge=0, description="CPUs per rollout worker.")
    rollout_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per rollout worker, e.g. {accelerator_node: 1}, to pin them to nodes.",
    )
    num_reward_workers: int = Field(1, ge=1, description="RewardWorker actors in the pool.")
    reward_gpus: float = Field(0.0, ge=0, description="GPUs per reward worker.")
    reward_cpus: float = Field(1.0, ge=0, description="CPUs per reward worker.")
    reward_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per reward worker."
    )
    num_learner_workers: int = Field(1, ge=1, description="Ray Train workers of the learner (DDP).")
    learner_gpus: float = Field(0.0, ge=0, description="GPUs per learner worker.")
    learner_cpus: float = Field(1.0, ge=0, description="CPUs per learner worker.")
    learner_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per learner worker."
    )
    placement: Literal["spread", "default"] = Field(
        "spread",
        description="Rollout/reward actors: spread over the nodes that have their resources (spread), or Ray's "
        "default scheduling (fills a node before the next). Learner workers form one placement group (PACK).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto",
        description="torch.distributed backend of the learner: auto = nccl when learner_gpus >= 1, else gloo.",
    )
    max_restarts: int = Field(
        3,
        ge=-1,
        description="Restarts of each rollout/reward actor (and retries of its lost tasks); -1 = no limit.",
    )
    max_learner_failures: int = Field(
        2,
        ge=-1,
        description="Learner restarts from the last checkpoint (Ray Train FailureConfig); -1 = no limit.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op threads per actor; None = the CPUs it reserves (at least 1), or, when "
        "jobs/finetune.py starts a local Ray, a share of the host's cores: actors that run at the same time "
        "split them (rollout and reward actors when scoring overlaps sampling; the learner workers).",
    )
    require_fit: bool = Field(
        True,
        description="Fail at start when the cluster cannot hold the plan; set False on an autoscaling cluster.",
    )
    start_timeout_s: float = Field(
        300.0, gt=0, description="Seconds to wait for the actors to start before giving up with an error."
    )

    @field_validator("rollout_resources")
    @classmethod
    def _rollout_custom(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_custom("rollout", v)

    @field_validator("reward_resources")
    @classmethod
    def _reward_custom(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_custom("reward", v)

    @field_validator("learner_resources")
    @classmethod
    def _learner_custom(cls, v: dict[str, float]) -> dict[str, float]:
        return _check_custom("learner", v)
