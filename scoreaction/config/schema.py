"""The whole run configuration: every section together, and the checks that span several sections.

Every field's description becomes ``--help`` text. Names follow the notation of README.md ("The method in
code"): t in [0, 1] with t = 0 data, ``kl_coef`` the KL weight of J = E[r] - kl_coef KL, ``sampler.eta`` the
member of the reverse-process family (1: reverse SDE, 0: probability-flow ODE).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from scoreaction.config.algorithm import AlgorithmConfig, ValueConfig
from scoreaction.config.base import ConfigSection
from scoreaction.config.model import ModelConfig, PolicyConfig
from scoreaction.config.resources import ResourcesConfig
from scoreaction.config.reward import RewardConfig
from scoreaction.config.run import RunConfig
from scoreaction.config.sampler import SamplerConfig


class Config(ConfigSection):
    model: ModelConfig = Field(default_factory=ModelConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    value: ValueConfig = Field(default_factory=ValueConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)

    @property
    def uses_value(self) -> bool:
        """Whether the run trains and uses the value function: ctrl (ddpo's advantages come from the final
        reward alone)."""
        return self.algorithm.name == "ctrl"

    @property
    def scores_x0_hat(self) -> bool:
        """Whether rollouts score x0_hat at every step: the value function's reward prior."""
        return self.uses_value and self.value.use_reward_prior

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        self._check_batch_layout()
        deterministic = self.sampler.eta == 0 or self.sampler.stepper == "heun"
        if self.sampler.stepper == "heun" and self.sampler.eta != 0:
            raise ValueError(
                f"sampler.eta={self.sampler.eta!r}: sampler.stepper='heun' is a deterministic ODE stepper; "
                "set sampler.eta=0"
            )
        ratio = self.algorithm.name == "ddpo" or self.algorithm.estimator == "ratio"
        if deterministic and ratio:
            field = (
                "algorithm.name='ddpo'" if self.algorithm.name == "ddpo" else "algorithm.estimator='ratio'"
            )
            raise ValueError(
                f"{field} needs transition log-probs, which the deterministic sampler "
                f"(sampler.stepper={self.sampler.stepper!r}, sampler.eta={self.sampler.eta!r}) does not have; "
                "use sampler.eta in (0, 1] with ddim/euler_maruyama, or algorithm.estimator='value_gradient'"
            )
        toy = self.model.preset == "toy-gmm"
        if toy and self.reward.name != "linear":
            raise ValueError(
                f"reward.name={self.reward.name!r}: the toy-gmm preset takes the 'linear' reward"
            )
        if self.reward.name == "linear":
            if not toy:
                raise ValueError(
                    "reward.name='linear' works on the toy-gmm preset only (images have no direction a)"
                )
            d = len(self.model.toy.means[0]) if self.model.toy.means else 0
            if self.reward.direction is None or len(self.reward.direction) != d:
                raise ValueError(
                    f"reward.direction={self.reward.direction!r} must be a list of {d} floats (the toy's dim)"
                )
        return self

    @property
    def optimizer_steps_per_epoch(self) -> int:
        """Policy optimizer steps per epoch (before any skipped step): updates_per_epoch passes of
        ceil(run.num_samples / trajectories_per_step) steps (one per micro-batch when trajectories_per_step
        is None; the last micro-batch may then be smaller)."""
        per_step = self.algorithm.trajectories_per_step or self.algorithm.micro_batch_size
        return self.algorithm.updates_per_epoch * -(-self.run.num_samples // per_step)

    def _check_batch_layout(self) -> None:
        """Batch sizes that would fail mid-run fail here. The data-parallel learner gives each of its
        workers an equal 1/W of every epoch's trajectories and of every micro-batch (W =
        resources.num_learner_workers), so W divides both. A rollout batch (sampler.batch_size) or a
        micro-batch that does not divide run.num_samples is fine: the last one is smaller."""
        w = self.resources.num_learner_workers
        if self.run.num_samples % w:
            raise ValueError(
                f"run.num_samples={self.run.num_samples} must be divisible by resources.num_learner_workers={w}: "
                "each learner worker updates an equal shard of every epoch's trajectories"
            )
        if self.algorithm.micro_batch_size % w:
            raise ValueError(
                f"algorithm.micro_batch_size={self.algorithm.micro_batch_size} must be divisible by "
                f"resources.num_learner_workers={w}: each worker takes micro_batch_size / {w} of every "
                "micro-batch and the gradients are averaged, as one process would compute them"
            )
        tps, mb = self.algorithm.trajectories_per_step, self.algorithm.micro_batch_size
        if tps is not None:
            if tps % mb:
                raise ValueError(
                    f"algorithm.trajectories_per_step={tps} must be a multiple of algorithm.micro_batch_size={mb}"
                    f" (each optimizer step accumulates whole micro-batches, split over resources."
                    f"num_learner_workers={w}); e.g. {max(1, round(tps / mb)) * mb}"
                )
            if self.run.num_samples % tps:
                raise ValueError(
                    f"algorithm.trajectories_per_step={tps} must divide run.num_samples={self.run.num_samples}: "
                    "every optimizer step averages the same number of trajectories"
                )
        if self.algorithm.stat_min_count > self.algorithm.stat_buffer:
            raise ValueError(
                f"algorithm.stat_min_count={self.algorithm.stat_min_count} must be <= "
                f"algorithm.stat_buffer={self.algorithm.stat_buffer}: a prompt's own statistics are used once "
                "it has stat_min_count rewards, and the buffer keeps only stat_buffer of them"
            )
