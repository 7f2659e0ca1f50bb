"""The ``resources`` section of the run configuration: how many Ray actors of each kind, and what each
one asks the cluster for. Its own module so that the distributed layer owns it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_rollout_workers: int = Field(1, ge=1, description="RolloutWorker actors (each holds a policy copy).")
    rollout_gpus: float = Field(
        0.0, ge=0, description="GPUs per rollout worker (fractions share a card; 0 on CPU)."
    )
    rollout_cpus: float = Field(1.0, ge=0, description="CPUs per rollout worker.")
    num_reward_workers: int = Field(1, ge=1, description="RewardWorker actors in the pool.")
    reward_gpus: float = Field(0.0, ge=0, description="GPUs per reward worker.")
    reward_cpus: float = Field(1.0, ge=0, description="CPUs per reward worker.")
    num_learner_workers: int = Field(1, ge=1, description="Ray Train workers of the learner (DDP).")
    learner_gpus: float = Field(0.0, ge=0, description="GPUs per learner worker.")
    learner_cpus: float = Field(1.0, ge=0, description="CPUs per learner worker.")
