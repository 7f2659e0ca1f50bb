"""Run configuration: pydantic models with one documented field per knob, presets, YAML and --set overrides.

Every field's description becomes ``--help`` text. Names follow the notation of README.md ("The method in
code"): t in [0, 1] with t = 0 data, ``kl_coef`` the KL weight of J = E[r] - kl_coef KL, ``sampler.eta`` the
member of the reverse-process family (1: reverse SDE, 0: probability-flow ODE).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from scoreaction.config_base import ConfigSection
from scoreaction.prompts import PROMPT_SETS, PromptFileError, PromptSet, builtin_prompts, read_prompts_file
from scoreaction.resources_config import ResourcesConfig
from scoreaction.reward_config import RewardConfig

ModelPreset = Literal["tiny", "toy-gmm", "sd15", "sd15-random", "digits"]
MODEL_PRESETS: tuple[str, ...] = ("tiny", "toy-gmm", "sd15", "sd15-random", "digits")
DEFAULT_SD15_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field, the value and what is allowed."""


class _Section(ConfigSection):
    """A section of the run config: no unknown keys, validated assignments, finite floats only."""


class ToyConfig(_Section):
    weights: list[float] = Field(
        default_factory=lambda: [0.5, 0.5], description="Mixture weights w_k (sum to 1)."
    )
    means: list[list[float]] = Field(
        default_factory=lambda: [[-2.0], [2.0]],
        description="Component means mu_k, one list of d floats each.",
    )
    std: float | list[float] = Field(
        0.5, description="Isotropic std of each component (one value or one per component)."
    )
    beta_min: float = Field(0.1, gt=0, description="Linear VP schedule: beta(0).")
    beta_max: float = Field(20.0, gt=0, description="Linear VP schedule: beta(1).")
    hidden: int = Field(64, ge=1, description="Width of the policy's correction MLP_theta(t, x).")
    t_end: float = Field(1e-3, gt=0, lt=1, description="Last time of the sampling grid (t runs 1 -> t_end).")


class ModelConfig(_Section):
    preset: ModelPreset = Field(
        "tiny", description="Model preset: tiny, toy-gmm, sd15, sd15-random or digits."
    )
    name_or_path: str | None = Field(
        None,
        description="Hub id or local diffusers folder. sd15: defaults to the SD1.5 hub id; any SD1.x/2.x folder "
        "works. tiny: the folder the tiny pipeline is written to (default: the scoreaction cache).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    device: str = Field(
        "auto", description="Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1..."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype of frozen weights and autocast: auto = bfloat16 on CUDA, float32 on CPU.",
    )
    seed: int = Field(
        0,
        description="Seed of the random weights of the tiny and sd15-random presets, and of the digits "
        "pretraining.",
    )
    tf32: bool = Field(True, description="Allow TF32 matmuls and convolutions on CUDA (Ampere and newer).")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile the UNet with this mode (off: eager)."
    )
    toy: ToyConfig = Field(
        default_factory=ToyConfig, description="The toy-gmm preset's mixture and schedule."
    )


class PolicyConfig(_Section):
    mode: Literal["lora", "full"] = Field(
        "lora", description="Train a LoRA adapter (lora) or every UNet weight (full)."
    )
    lora_rank: int = Field(4, ge=1, le=1024, description="LoRA rank r.")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; None means alpha = rank (scale 1).")
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="UNet attention projections that receive LoRA layers.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute UNet activations in backward to save memory."
    )


class SamplerConfig(_Section):
    stepper: Literal["ddim", "euler_maruyama", "heun"] = Field(
        "ddim",
        description="Transition kernel: ddim (DDIM-eta; eta=1 is DDPM), euler_maruyama on the reverse SDE, "
        "or heun (deterministic second-order probability-flow ODE; needs eta=0).",
    )
    num_steps: int = Field(50, ge=1, le=1000, description="Number of denoising steps N.")
    eta: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Reverse-process family member in [0, 1]: 1 = reverse SDE, 0 = deterministic ODE "
        "(no transition log-probs: only the value_gradient estimator trains on it).",
    )
    guidance_scale: float = Field(7.5, ge=0.0, le=50.0, description="Classifier-free guidance weight w.")
    negative_prompt: str = Field("", description="Prompt of the unconditional branch of guidance.")
    height: int | None = Field(
        None, ge=8, le=4096, multiple_of=8, description="Image height in px (default: model's)."
    )
    width: int | None = Field(
        None, ge=8, le=4096, multiple_of=8, description="Image width in px (default: model's)."
    )
    batch_size: int = Field(8, ge=1, description="Trajectories sampled per UNet batch.")


class AlgorithmConfig(_Section):
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


class ValueConfig(_Section):
    use_reward_prior: bool = Field(
        True,
        description="V = cos(pi t/2) R(x0_hat) + sin(pi t/2) F_phi; False: V = F_phi alone (reward too costly).",
    )
    hidden: int = Field(64, ge=1, description="Width of F_phi.")
    learning_rate: float = Field(1e-3, gt=0, description="Adam learning rate of F_phi.")
    updates_per_epoch: int = Field(
        4, ge=0, description="Regression passes of F_phi per epoch (before the policy update)."
    )
    pretrain_epochs: int = Field(
        0, ge=0, description="Epochs of frozen-model rollouts to pre-train F_phi on."
    )


class RunConfig(_Section):
    seed: int = Field(0, description="Seed of sampling noise, prompts and initialisation.")
    epochs: int = Field(
        3, ge=0, description="Fine-tuning epochs (rollout, reward, value update, policy update)."
    )
    checkpoint_every: int = Field(
        1, ge=1, description="Write a checkpoint every this many epochs (and at the end)."
    )
    keep_checkpoints: int | None = Field(
        None,
        ge=1,
        description="Keep only the newest this many checkpoints (never deleting the one 'latest' names); "
        "None = keep all.",
    )
    grid_every: int = Field(
        1, ge=1, description="Write a sample grid every this many epochs (image presets)."
    )
    output_dir: str = Field("outputs/run", description="Where checkpoints, logs, grids and summary.json go.")
    storage_path: str | None = Field(
        None,
        description="Shared storage (a path every node sees, or a URI) for Ray Train's run state; "
        "None = under output_dir.",
    )
    num_samples: int = Field(16, ge=1, description="Trajectories sampled per epoch.")
    prompts: list[str] = Field(
        default_factory=lambda: [
            "a photo of a cat",
            "a watercolor painting of a lighthouse",
            "a red bicycle leaning on a wall",
            "a bowl of ramen, studio lighting",
        ],
        min_length=1,
        description="Prompt set sampled from (round robin); at least one. Filled from run.prompts_file or "
        "run.prompt_set when one of them is set.",
    )
    prompts_file: str | None = Field(
        None,
        description="A text file of prompts, one a line (blank lines and lines starting with # are skipped), "
        "read when the config is built; its prompts become run.prompts.",
    )
    prompt_set: PromptSet | None = Field(
        None,
        description="A built-in prompt set, shipped with the package: single_prompt (the authors' ImageReward "
        "prompt, 'A unicorn in a clearing...'), simple_animals (ddpo-pytorch's 45 animals), imagenet_animals "
        "(ddpo-pytorch's 398 ImageNet animal classes); its prompts become run.prompts.",
    )

    @model_validator(mode="before")
    @classmethod
    def _load_prompts(cls, data: Any) -> Any:
        """run.prompts from run.prompts_file or run.prompt_set. A config that already lists the prompts
        (one re-validated from its dump, e.g. on a learner worker where the file is not) keeps them when the
        file cannot be read there; prompts that differ from the file's or the set's are an error."""
        if not isinstance(data, dict):
            return data
        file, name = data.get("prompts_file"), data.get("prompt_set")
        if file is None and name is None:
            return data
        if file is not None and name is not None:
            raise ValueError(
                f"run.prompts_file={file!r} and run.prompt_set={name!r}: set one of them (both give run.prompts)"
            )
        if name is not None and name not in PROMPT_SETS:
            return data  # the field's own check names the allowed sets
        if file is not None and not isinstance(file, str):
            return data  # the field's own check reports the type
        given = data.get("prompts")
        try:
            loaded = builtin_prompts(name) if name is not None else read_prompts_file(file)
        except PromptFileError:
            if given is not None and file is not None:
                return data
            raise
        source = f"run.prompt_set={name!r}" if name is not None else f"run.prompts_file={file!r}"
        if given is not None and list(given) != loaded:
            raise ValueError(
                f"run.prompts (a list of {len(given)}) differs from the {len(loaded)} prompts of {source}: "
                f"set one of them (e.g. {source.split('=')[0]}=null)"
            )
        return {**data, "prompts": loaded}


class Config(_Section):
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


# --------------------------------------------------------------------------------------------------
# Presets (functions, so each call returns a fresh dict)
# --------------------------------------------------------------------------------------------------


def _tiny() -> dict[str, Any]:
    return {
        "model": {"preset": "tiny"},
        # The tiny UNet has two cross-attention blocks of 32 and 64 channels: LoRA on attention alone barely
        # moves its images (DDPO's JPEG reward rose by 0.017 / 0.057 kB in 8 epochs on seeds 1 / 0). With the
        # ResNet convolutions and the transformers' projections too: DDPO +0.079 / +0.094 / +0.052 on seeds
        # 0 / 1 / 2, CTRL +0.145 / +0.102 / +0.206.
        "policy": {
            "lora_target_modules": [
                *("to_q", "to_k", "to_v", "to_out.0"),
                *("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"),
            ]
        },
        "sampler": {"num_steps": 20, "guidance_scale": 5.0, "batch_size": 16},
        "reward": {"name": "jpeg_compressibility"},
        # The random tiny model's JPEG sizes vary little (std 0.06 kB) and move slowly per unit of KL, so the
        # KL weight is small and the steps large; the reward prior makes CTRL's TD advantages informative
        # (F_phi alone, learned from 32 samples an epoch, left the reward flat).
        "algorithm": {"kl_coef": 1e-4, "learning_rate": 1e-2, "clip_range": 1e-2, "micro_batch_size": 16},
        "value": {"use_reward_prior": True},
        "run": {"epochs": 8, "num_samples": 32},
    }


def _toy_gmm() -> dict[str, Any]:
    """README.md, "The toy with a known optimum": w = (.5, .5), mu = -2, +2, std .5, a = 1, kl_coef = 2."""
    return {
        "model": {"preset": "toy-gmm"},
        "sampler": {"stepper": "euler_maruyama", "num_steps": 20, "guidance_scale": 1.0, "batch_size": 4096},
        "reward": {"name": "linear", "direction": [1.0]},
        # Measured on this toy: TD advantages (gae_lambda 0) inherit the learned value's error and stall near
        # 0.93 J*; Monte-Carlo returns less the value (gae_lambda 1) reach 0.94 J* in 50 epochs at 40 steps.
        "algorithm": {
            "kl_coef": 2.0,
            "learning_rate": 3e-3,
            "lr_schedule": "cosine",
            "lr_final_ratio": 0.05,
            "gae_lambda": 1.0,
            "clip_range": 0.2,
            "micro_batch_size": 256,
            "updates_per_epoch": 1,
        },
        "value": {"hidden": 64, "learning_rate": 3e-3, "updates_per_epoch": 8},
        "run": {"epochs": 60, "num_samples": 4096, "checkpoint_every": 10},
    }


def _sd15() -> dict[str, Any]:
    return {
        "model": {"preset": "sd15", "name_or_path": DEFAULT_SD15_ID},
        "policy": {"gradient_checkpointing": True},
        "sampler": {"num_steps": 50, "guidance_scale": 7.0, "batch_size": 8},
        # from the released CTRL code: LoRA rank 4, AdamW 5e-5, clip 1.5e-5 on dim-averaged log-probs,
        # 512 samples/epoch, grad-clip 1.0. Unlike the authors (2 optimizer steps an epoch, see
        # sd15-ctrl-paper), this preset makes 2 passes with one optimizer step per micro-batch of 2: 512
        # steps an epoch (trajectories_per_step None), kept as it was so earlier results stay comparable.
        "algorithm": {
            "learning_rate": 5e-5,
            "clip_range": 1.5e-5,
            "updates_per_epoch": 2,
            "micro_batch_size": 2,
        },
        "value": {"use_reward_prior": False},
        "run": {"epochs": 100, "num_samples": 512, "checkpoint_every": 5, "grid_every": 5},
    }


# The authors' SD1.5 ImageReward experiment (README.md, "The paper's presets"), from
# github.com/hanyang1999/ContTimeRL4DM, ddpo_continuous/ (a ddpo-pytorch fork). Commits:
#   B  = 82b2ca60aed3585ad68e1d19c9edc7a461740f27  config/base.py, config/dgx.py, jobs.sh (4 GPUs per run),
#        scripts/train_with_valuefunc_cont.py, scripts/src/ImageReward_VN_train.py, setup.py (diffusers 0.17.1)
#   V  = d1d7c02a9c1811beea3a5880ef12a940319f611d  config/dgx_with_value_func.py (imagereward())
#   P  = 5b6105a0c0f2cf643f73631d62fad25130c9fd47  ddpo_pytorch/assets/single_prompt.txt
#   D  = 2dfa82b2d5757637d32e0b2afb7f3aa150f74450  scripts/DDPO_varying_steps_infr.py (the DDPO run)
# Per-run numbers are global (4 GPUs): samples = sample.batch_size * num_batches_per_epoch * 4, trajectories
# per optimizer step = train.batch_size * gradient_accumulation_steps * 4.
def _sd15_paper_common() -> dict[str, Any]:
    return {
        # B base.py: pretrained.model = "runwayml/stable-diffusion-v1-5" (now served as DEFAULT_SD15_ID)
        "model": {"preset": "sd15", "name_or_path": DEFAULT_SD15_ID},
        # B base.py use_lora = True; train_*.py: diffusers 0.17.1 LoRAAttnProcessor on every attention
        # processor (to_q, to_k, to_v, to_out), its default rank 4, no network_alpha (scale 1).
        # Gradient checkpointing is ours (memory), not the authors'.
        "policy": {
            "mode": "lora",
            "lora_rank": 4,
            "lora_alpha": None,
            "lora_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "gradient_checkpointing": True,
        },
        # B base.py: sample.num_steps 50, eta 1.0, guidance_scale 7.0 (DDIM); train.cfg = True
        "sampler": {"stepper": "ddim", "num_steps": 50, "eta": 1.0, "guidance_scale": 7.0, "batch_size": 8},
        # V / B dgx.py imagereward(): reward_fn = "imagereward", raw scores (no running normalisation)
        "reward": {"name": "imagereward", "normalize": "none"},
        "algorithm": {
            # B base.py: use_regularization = False (the runs are named "no_regularization")
            "kl_coef": 0.0,
            # B base.py: adv_clip_max 5, max_grad_norm 1.0, adam_weight_decay 1e-4, timestep_fraction 1.0,
            # num_inner_epochs 1; constant learning rate
            "adv_clip": 5.0,
            "max_grad_norm": 1.0,
            "weight_decay": 1e-4,
            "timestep_fraction": 1.0,
            "updates_per_epoch": 1,
            "lr_schedule": "constant",
            # train.batch_size = 4 per GPU: a memory knob here (the step averages the same trajectories)
            "micro_batch_size": 4,
        },
        # B base.py: num_epochs 100 (dgx*.py imagereward(): 100); P: prompt_fn = "single_prompt". Their seed
        # (42) is not carried over: our random streams differ, so it would not reproduce their samples.
        "run": {
            "epochs": 100,
            "prompt_set": "single_prompt",
            "checkpoint_every": 5,
            "grid_every": 5,
        },
    }


def _sd15_ctrl_paper() -> dict[str, Any]:
    """CTRL as the authors ran it on SD1.5 + ImageReward (scripts/train_with_valuefunc_cont.py with
    config/dgx_with_value_func.py:imagereward on 4 GPUs)."""
    cfg = _sd15_paper_common()
    cfg["algorithm"].update(
        {
            "name": "ctrl",
            # train_with_valuefunc_cont.py: PPO-clipped ratio with advantages V(x_{k+1}) - V(x_k)
            # (ImageReward_VN_train.py inference_advantage_batch), normalised per timestep over the batch
            "estimator": "ratio",
            "gae_lambda": 0.0,
            # V: train.learning_rate 5e-5, train.clip_range 1.5e-5 (3e-5 / 1e-5 at B)
            "learning_rate": 5e-5,
            "clip_range": 1.5e-5,
            # V: train.batch_size 4 x gradient_accumulation_steps 16 x 4 GPUs = 256 per step
            "trajectories_per_step": 256,
        }
    )
    # V: design cos/sin blend of the value of the denoised (x0_hat) and the noisy image; v_step = 1.
    # The authors' value network is a copy of ImageReward (pre-trained offline, lr 1e-7); ours is the small
    # conv head F_phi at its own learning rate, not pre-trained.
    cfg["value"] = {"use_reward_prior": True, "updates_per_epoch": 1}
    # V: sample.batch_size 64 x num_batches_per_epoch 2 x 4 GPUs = 512 samples; 512 / 256 = 2 steps/epoch
    cfg["run"]["num_samples"] = 512
    return cfg


def _sd15_ddpo_paper() -> dict[str, Any]:
    """DDPO as the authors ran it for comparison (scripts/DDPO_varying_steps_infr.py with
    config/dgx.py:imagereward on 4 GPUs)."""
    cfg = _sd15_paper_common()
    cfg["algorithm"].update(
        {
            "name": "ddpo",
            # B dgx.py imagereward(): train.learning_rate 3e-5, train.clip_range 1e-5
            "learning_rate": 3e-5,
            "clip_range": 1e-5,
            # B dgx.py: train.batch_size 4 x gradient_accumulation_steps 8 x 4 GPUs = 128 per step
            "trajectories_per_step": 128,
            # B dgx.py compressibility() (inherited): per_prompt_stat_tracking buffer_size 16, min_count 16
            "stat_buffer": 16,
            "stat_min_count": 16,
        }
    )
    # B dgx.py imagereward(): sample.batch_size 64 x num_batches_per_epoch 1 x 4 GPUs = 256 samples;
    # 256 / 128 = 2 steps/epoch
    cfg["run"]["num_samples"] = 256
    return cfg


def _sd15_random() -> dict[str, Any]:
    cfg = _sd15()
    cfg["model"] = {"preset": "sd15-random"}
    return cfg


def _digits() -> dict[str, Any]:
    """SD-architecture model pretrained on the UCI handwritten digits (scoreaction/models/digits.py), tuned
    to draw the prompted digit: reward = log p(digit) under one classifier, monitored by another."""
    return {
        "model": {"preset": "digits"},
        "policy": {
            "lora_rank": 4,
            "lora_target_modules": [
                *("to_q", "to_k", "to_v", "to_out.0"),
                *("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"),
            ],
        },
        # Measured --single-process with OMP_NUM_THREADS=1 on the shared 2-core machine: 46 s an epoch (40
        # samples, 20 steps), 109 s for 2 epochs; with torch's default 2 threads the first epoch had not ended
        # after 8 minutes (OpenMP threads spinning against other jobs). KL after one epoch ~58: lr untuned.
        "sampler": {"num_steps": 20, "guidance_scale": 2.0, "eta": 1.0, "batch_size": 20},
        "reward": {"name": "digit_classifier", "monitor": ["digit_classifier_heldout"]},
        "algorithm": {"kl_coef": 1e-3, "learning_rate": 3e-3, "clip_range": 1e-2, "micro_batch_size": 10},
        "value": {"use_reward_prior": True},
        "run": {
            "epochs": 4,
            "num_samples": 40,
            "prompts": [f"a handwritten digit {d}" for d in range(10)],
        },
    }


PRESETS = {
    "tiny": _tiny,
    "toy-gmm": _toy_gmm,
    "sd15": _sd15,
    "sd15-random": _sd15_random,
    "sd15-ctrl-paper": _sd15_ctrl_paper,
    "sd15-ddpo-paper": _sd15_ddpo_paper,
    "digits": _digits,
}


def preset(name: str) -> dict[str, Any]:
    """The override dict of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r} is unknown; allowed presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = (
            _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
        )
    return out


def parse_set(item: str) -> dict[str, Any]:
    """'a.b.c=value' -> {'a': {'b': {'c': value}}}; the value parses as YAML (lists, numbers, null...)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like dotted.key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set key {key!r} is not a dotted name such as sampler.num_steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}={raw!r}: the value is not valid YAML ({exc})") from exc
    out: dict[str, Any] = value
    for p in reversed(parts):
        out = {p: out}
    return out


def _is_union_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a member of a union (float, list[float], ...)."""
    return isinstance(part, str) and (part in ("float", "int", "str", "bool", "none") or "[" in part)


def format_validation_error(exc: ValidationError) -> str:
    """One line per bad field: 'dotted.field=value: what is allowed'. A value that fails every member of a
    union is reported once, with its first member's reason; checks of a whole section or of the whole
    config name their fields in their own message."""
    lines: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
        if loc in seen:
            continue
        seen.add(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "finite_number":
            msg = "must be a finite number (NaN and +-inf are not allowed)"
        value = err.get("input")
        if not loc:
            lines.append(msg)
        elif err["type"] == "value_error" and isinstance(value, dict) and len(repr(value)) > 120:
            lines.append(f"{loc}: {msg}")  # a whole section's check: its message names the fields
        else:
            lines.append(f"{loc}={value!r}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def set_value(key: str, value: Any) -> dict[str, Any]:
    """'a.b.c', value -> {'a': {'b': {'c': value}}}: an override whose value is taken as is (not YAML), such
    as a path from a command-line option ('/data/run #2' stays '/data/run #2')."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"{key!r} is not a dotted name such as run.output_dir")
    out: dict[str, Any] = value
    for p in reversed(parts):
        out = {p: out}
    return out


def build_config(
    preset_name: str = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Preset, then YAML file, then --set overrides (values parsed as YAML), then `values` ({dotted key:
    value}, taken literally: paths and other strings from options), validated. Raises ConfigError naming
    each bad field."""
    data = preset(preset_name)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r} must hold a YAML mapping, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    for item in overrides or []:
        data = _merge(data, parse_set(item))
    for key, value in (values or {}).items():
        data = _merge(data, set_value(key, value))
    return validate_config(data)


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
