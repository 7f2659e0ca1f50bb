"""Rollouts: shapes, exact on-policy ratios, agreement with diffusers' own pipeline."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_lora
from diffusers import StableDiffusionPipeline

from scoreaction.config import ModelConfig, SamplerConfig
from scoreaction.sampling import Trajectory, evaluate_log_probs, sample_trajectories, transition

PROMPTS = [
    "a photo of a cat",
    "a red bicycle",
    "a lighthouse at dusk",
    "ramen",
    "a dog",
    "a tree",
    "a car",
    "a boat",
]


@pytest.fixture(scope="module")
def lora_policy(tiny_dir):
    from scoreaction.policy import DiffusionPolicy

    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny", name_or_path=str(tiny_dir)))
    randomize_lora(policy)
    return policy


@pytest.mark.parametrize("stepper", ["ddim", "euler_maruyama"])
def test_trajectory_shapes(tiny_policy, stepper):
    sampler = SamplerConfig(stepper=stepper, num_steps=5, guidance_scale=4.0)
    traj = sample_trajectories(tiny_policy, PROMPTS[:3], sampler, torch.Generator().manual_seed(0))
    assert traj.latents.shape == (3, 6, 4, 8, 8)
    assert traj.timesteps.shape == (6,) and bool((traj.timesteps[1:] < traj.timesteps[:-1]).all())
    assert traj.log_probs.shape == (3, 5) and traj.log_probs.dtype == torch.float32
    assert traj.prompt_embeds.shape == (3, 77, 32) and traj.negative_prompt_embeds.shape == (3, 77, 32)
    assert (
        traj.images.shape == (3, 3, 64, 64) and 0 <= float(traj.images.min()) <= float(traj.images.max()) <= 1
    )
    assert torch.isfinite(traj.log_probs).all()


@pytest.mark.parametrize("stepper", ["ddim", "euler_maruyama"])
def test_on_policy_ratio_is_exactly_one(lora_policy, stepper):
    """Same parameters, same batch: bitwise-identical log-probs. Other batch sizes and a shuffled order:
    the per-step log-ratio averaged over dimensions stays below 1e-5 (a tenth of DDPO's clip range)."""
    sampler = SamplerConfig(stepper=stepper, num_steps=6, guidance_scale=5.0)
    traj = sample_trajectories(lora_policy, PROMPTS, sampler, torch.Generator().manual_seed(0), decode=False)
    assert torch.equal(evaluate_log_probs(lora_policy, traj), traj.log_probs)

    d = traj.latents[0, 0].numel()
    worst = 0.0
    for batch in (1, 3, 8):
        order = torch.randperm(8, generator=torch.Generator().manual_seed(batch))
        for chunk in order.split(batch):
            sub = traj.index(chunk)
            log_ratio = (evaluate_log_probs(lora_policy, sub) - sub.log_probs) / d
            worst = max(worst, float(log_ratio.abs().max()))
    print(f"\n[{stepper}] largest |log-ratio| / D over batch sizes 1, 3, 8 (shuffled): {worst:.3e}")
    assert worst < 1e-5


def test_transition_is_differentiable_in_lora_only(lora_policy):
    sampler = SamplerConfig(num_steps=3, guidance_scale=5.0)
    traj = sample_trajectories(
        lora_policy, PROMPTS[:2], sampler, torch.Generator().manual_seed(0), decode=False
    )
    out = transition(lora_policy, traj, 1)
    out.log_prob.sum().backward()
    grads = {n: p.grad for n, p in lora_policy.unet.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
    lora_policy.unet.zero_grad(set_to_none=True)


def test_reference_disables_the_adapter(lora_policy):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = lora_policy.encode_prompts(PROMPTS[:2])
    t = torch.tensor(0.5, dtype=torch.float64)
    with torch.no_grad():
        eps_theta = lora_policy.predict_eps(x, t, emb, None, 1.0)
        with lora_policy.reference():
            eps_ref = lora_policy.predict_eps(x, t, emb, None, 1.0)
        again = lora_policy.predict_eps(x, t, emb, None, 1.0)
    assert not torch.allclose(eps_theta, eps_ref)
    assert torch.equal(eps_theta, again)


def test_matches_diffusers_pipeline_for_same_seed(tiny_policy, tiny_dir):
    """DDIM eta=1 with the same seed: our sampler reproduces StableDiffusionPipeline's images."""
    sampler = SamplerConfig(num_steps=10, guidance_scale=7.5)
    traj = sample_trajectories(tiny_policy, PROMPTS[:2], sampler, torch.Generator().manual_seed(42))
    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_dir), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        PROMPTS[:2],
        num_inference_steps=10,
        guidance_scale=7.5,
        eta=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(42),
    )
    torch.testing.assert_close(traj.images, out.images, atol=1e-4, rtol=0)


def test_trajectory_index_and_cat_roundtrip(tiny_policy):
    traj = sample_trajectories(
        tiny_policy, PROMPTS[:4], SamplerConfig(num_steps=2), torch.Generator().manual_seed(0)
    )
    parts = [traj.index([0, 1]), traj.index(slice(2, 4))]
    back = Trajectory.cat(parts)
    assert back.prompts == traj.prompts
    assert torch.equal(back.latents, traj.latents) and torch.equal(back.log_probs, traj.log_probs)
    assert back.index([3]).prompts == [PROMPTS[3]]


def test_bad_sampler_input(tiny_policy):
    bad = SamplerConfig.model_construct(**{**SamplerConfig().model_dump(), "num_steps": 0})
    with pytest.raises(ValueError, match=r"sampler.num_steps=0 must be an integer >= 1"):
        sample_trajectories(tiny_policy, ["a"], bad)
    bad = SamplerConfig.model_construct(**{**SamplerConfig().model_dump(), "eta": -1.0})
    with pytest.raises(ValueError, match=r"sampler.eta=-1.0 is outside \[0, 1\]"):
        sample_trajectories(tiny_policy, ["a"], bad)
    bad = SamplerConfig.model_construct(**{**SamplerConfig().model_dump(), "stepper": "heun", "eta": 1.0})
    with pytest.raises(ValueError, match="the heun stepper is deterministic"):
        sample_trajectories(tiny_policy, ["a"], bad)
    with pytest.raises(ValueError, match="prompts is empty"):
        sample_trajectories(tiny_policy, [], SamplerConfig())
    with pytest.raises(ValueError, match="sampler.height=60 must be a multiple of 8"):
        tiny_policy.latent_shape(60, None)
