"""Presets: named override dicts for build_config (functions, so each call returns a fresh dict)."""

from __future__ import annotations

from typing import Any

from scoreaction.config.base import ConfigError
from scoreaction.config.model import DEFAULT_SD15_ID


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
        # steps an epoch (trajectories_per_step None).
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
        # B base.py: pretrained.model = "runwayml/stable-diffusion-v1-5" (the same weights are published as
        # DEFAULT_SD15_ID)
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
            # the authors log the reward at 25 and 100 sampling steps every epoch (trained at 50); the size of
            # the evaluation set (64, one of their per-GPU sampling batches) is ours
            "eval_num_steps": [25, 100],
            "eval_num_samples": 64,
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
    # The authors' value network (scoreaction/value_networks.py): V design {"first": "denoised", "second":
    # "original", "skip_func_in": "cos", "skip_func_out": "sin"}: cos(pi t/2) ImageReward(decode(x0_hat)) +
    # sin(pi t/2) ImageReward_phi(decode(x_t)); B ImageReward_VN_train.py load(): fix_rate=0.7.
    # V pretrain_VN (used while fine-tuning, B init_value_function: AdamW over the trainable parameters,
    # constant rate): learning_rate 1e-7, adam_weight_decay 0.01, max_grad_norm 1.0 (betas 0.9/0.999, eps
    # 1e-8: torch's defaults); v_step 1. pretrained_VN_path: .../image_reward_training_fixrate=0.7_cos-sin_
    # warmup=0.05_2025.01.29_13.07.45/value_network_epoch_60.pt: B scripts/pretrain/src (pretrain.py,
    # config/base_cos_sin.py) saves after epoch index 60, so 61 epochs of frozen-model rollouts (theirs:
    # 64 x 8 GPUs = 512 samples at guidance 7.5, v_step 3, lr 1e-7 cosine with 5 warm-up epochs; ours:
    # the run's sampler and samples, value.updates_per_epoch passes at the constant rate).
    # batch_size 100 (states per value step) has no equal here: chunk_size only bounds memory.
    cfg["value"] = {
        "kind": "imagereward",
        "use_reward_prior": True,
        "frozen_fraction": 0.7,
        "learning_rate": 1e-7,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "updates_per_epoch": 1,
        "pretrain_epochs": 61,
        "chunk_size": 100,
    }
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
