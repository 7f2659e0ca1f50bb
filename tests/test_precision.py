"""Precision and compilation switches: frozen weights in the compute dtype, trainable weights and every
number the math consumes in float32, the on-policy ratio still exactly 1; torch.compile and TF32 wiring."""

from __future__ import annotations

import pytest
import torch

from scoreaction.config import ModelConfig, SamplerConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.sampling import evaluate_log_probs, sample_trajectories


def _check_mixed_precision(policy: DiffusionPolicy, compute: torch.dtype) -> None:
    assert policy.unet.conv_in.weight.dtype == compute and policy.vae.dtype == compute
    assert policy.trainable_parameters() and all(
        p.dtype == torch.float32 for p in policy.trainable_parameters()
    )
    gen = torch.Generator(device=policy.device).manual_seed(0)
    traj = sample_trajectories(policy, ["a cat", "a dog", "a cup"], SamplerConfig(num_steps=3), gen)
    assert traj.latents.dtype == traj.log_probs.dtype == traj.images.dtype == torch.float32
    # re-evaluating the same parameters on the stored transitions: ratio exactly 1, shuffled batch too
    assert torch.equal(evaluate_log_probs(policy, traj), traj.log_probs)
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(evaluate_log_probs(policy, traj.index(perm)), traj.log_probs[perm])


def test_bfloat16_frozen_weights_fp32_trainable_weights_and_log_probs(tiny_dir):
    policy = DiffusionPolicy.from_config(
        ModelConfig(preset="tiny", name_or_path=str(tiny_dir), dtype="bfloat16")
    )
    _check_mixed_precision(policy, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_autocast_and_tf32(tiny_dir, dtype):
    cfg = ModelConfig(preset="tiny", name_or_path=str(tiny_dir), device="cuda", dtype=dtype, tf32=False)
    policy = DiffusionPolicy.from_config(cfg)
    assert not torch.backends.cuda.matmul.allow_tf32
    _check_mixed_precision(policy, getattr(torch, dtype))
    DiffusionPolicy.from_config(cfg.model_copy(update={"tf32": True}))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.slow
def test_compiled_unet_matches_eager(tiny_dir):
    eager = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    compiled = DiffusionPolicy.from_config(
        ModelConfig(preset="tiny", name_or_path=str(tiny_dir), compile="default")
    )
    x = torch.randn(2, *eager.latent_shape(None, None), generator=torch.Generator().manual_seed(0))
    emb = eager.encode_prompts(["a cat", "a dog"])
    t = torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        ref = eager.predict_eps(x, t, emb, None, 1.0)
        out = compiled.predict_eps(x, t, emb, None, 1.0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
