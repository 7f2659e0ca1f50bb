"""The algorithm and value sections: the policy-gradient method (ctrl or ddpo), its objective, optimiser and
batch layout, and the value function F_phi that ctrl's advantages use."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from scoreaction.config.base import ConfigSection


class AlgorithmConfig(ConfigSection):
    name: Literal["ctrl", "ddpo"] = Field(
        "ctrl", description="ctrl (score as action, TD advantages) or ddpo."
    )
    estimator: Literal["ratio", "value_gradient"] = Field(
        "ratio",
        description="ctrl policy gradient: clipped likelihood ratio, or the continuous-time value gradient.",
    )
    kl_coef: float = Field(
        0.01, ge=0, description="beta_kl: weight of KL(P_theta || P_pre) in the objective."
    )
    clip_range: float = Field(
        1e-4, gt=0, description="PPO clip epsilon on the ratio of dim-averaged log-probs."
    )
    gae_lambda: float = Field(
        0.0,
        ge=0,
        le=1,
        description="ctrl: advantages sum_j lam^(j-k) delta_j of the TD advantages delta (0: TD advantages as in "
        "the paper; 1: Monte-Carlo return less the value, unbiased whatever the value's error).",
    )
    adv_clip: float = Field(
        5.0, gt=0, description="Advantages are clipped to +-adv_clip after normalisation."
    )
    learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate of the policy.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay of the policy (ddpo-pytorch and the authors: 1e-4)."
    )
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="Policy learning rate over the run's epochs: constant, or decayed (cosine / linear) from "
        "learning_rate to lr_final_ratio * learning_rate at the last epoch.",
    )
    lr_final_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Final policy learning rate as a fraction of learning_rate (decayed schedules).",
    )
    updates_per_epoch: int = Field(1, ge=1, description="Passes over each epoch's trajectories.")
    micro_batch_size: int = Field(
        8,
        ge=1,
        description="Trajectories per backward pass (summed over the data-parallel learner workers, each "
        "taking micro_batch_size / resources.num_learner_workers of them); the gradient accumulates over "
        "the trained timesteps of each.",
    )
    trajectories_per_step: int | None = Field(
        None,
        ge=1,
        description="Trajectories per optimizer step (over all data-parallel learner workers): the gradient "
        "is accumulated over trajectories_per_step / micro_batch_size micro-batches and their timesteps, "
        "averaged, then clipped and stepped once, as ddpo-pytorch's train.batch_size * num_gpus * "
        "gradient_accumulation_steps. A multiple of micro_batch_size that divides run.num_samples; optimizer "
        "steps per epoch = updates_per_epoch * run.num_samples / trajectories_per_step "
        "(learner/optimizer_steps). None: micro_batch_size (one step per micro-batch).",
    )
    timestep_fraction: float = Field(
        1.0, gt=0, le=1, description="Fraction of each trajectory's steps trained."
    )
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient-norm clipping of each optimiser step.")
    max_skipped_steps: int = Field(
        1,
        ge=0,
        description="Optimiser steps whose loss or gradient norm is NaN/inf are skipped (the weights and "
        "optimiser state stay as they were) and counted (learner/skipped_steps, value/skipped_steps); more "
        "than this many in one epoch, per optimiser, stops the run. 0: the first one stops it.",
    )
    stat_buffer: int = Field(32, ge=1, description="ddpo: rewards kept per prompt by the stat tracker.")
    stat_min_count: int = Field(
        16, ge=1, description="ddpo: per-prompt stats used once a prompt has this many."
    )


class ValueConfig(ConfigSection):
    kind: Literal["conv", "imagereward"] = Field(
        "conv",
        description="F_phi: conv (a small conv head on the latent, time features and the pooled prompt "
        "embedding) or imagereward (a copy of the ImageReward model on the decoded state, the lower "
        "frozen_fraction of its layers frozen, as the paper's authors; image presets only).",
    )
    use_reward_prior: bool = Field(
        True,
        description="V = cos(pi t/2) R(x0_hat) + sin(pi t/2) F_phi; False: V = F_phi alone (reward too costly).",
    )
    hidden: int = Field(64, ge=1, description="Width of F_phi (kind conv).")
    learning_rate: float = Field(1e-3, gt=0, description="Learning rate of F_phi's optimiser.")
    weight_decay: float = Field(
        0.0,
        ge=0,
        description="Decoupled (AdamW) weight decay of F_phi; 0: plain Adam. The authors' value network: 0.01.",
    )
    max_grad_norm: float | None = Field(
        None,
        gt=0,
        description="Gradient-norm clipping of each F_phi step (over its trainable parameters); None: none. "
        "The authors' value network: 1.0.",
    )
    frozen_fraction: float = Field(
        0.7,
        ge=0,
        le=1,
        description="kind imagereward: fraction of the BLIP vision and text layers frozen, from the input side, "
        "with the embeddings (ImageReward's fix_rate; the authors' value network: 0.7).",
    )
    weights: str | None = Field(
        None,
        description="kind imagereward: the ImageReward weights F_phi starts from (as reward.imagereward.weights; "
        "its BERT tokenizer is reward.imagereward.tokenizer). None: reward.imagereward.weights.",
    )
    chunk_size: int = Field(
        64,
        ge=1,
        description="kind imagereward: states per forward pass of the network (decode + BLIP); with gradients, "
        "each chunk's activations are recomputed in the backward pass, so memory is bounded by the chunk.",
    )
    updates_per_epoch: int = Field(
        4, ge=0, description="Regression passes of F_phi per epoch (before the policy update)."
    )
    pretrain_epochs: int = Field(
        0, ge=0, description="Epochs of frozen-model rollouts to pre-train F_phi on."
    )
