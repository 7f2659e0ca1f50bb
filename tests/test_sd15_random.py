"""The sd15-random preset builds SD1.5's exact architecture and samples (slow: ~1B random parameters)."""

from __future__ import annotations

import pytest
import torch

from scoreaction.config import ModelConfig, SamplerConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.sampling import evaluate_log_probs, sample_trajectories


@pytest.mark.slow
def test_sd15_random_samples_with_exact_log_probs():
    policy = DiffusionPolicy.from_config(ModelConfig(preset="sd15-random"))
    assert sum(p.numel() for n, p in policy.unet.named_parameters() if "lora_" not in n) == 859_520_964
    sampler = SamplerConfig(num_steps=2, guidance_scale=7.5, height=256, width=256)
    traj = sample_trajectories(policy, ["a cat"], sampler, torch.Generator().manual_seed(0))
    assert traj.latents.shape == (1, 3, 4, 32, 32) and traj.images.shape == (1, 3, 256, 256)
    assert torch.equal(evaluate_log_probs(policy, traj), traj.log_probs)
