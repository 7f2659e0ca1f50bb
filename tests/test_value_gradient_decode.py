"""The value-gradient estimator's grad_x V(t, x) includes the reward prior's term
cos(pi t/2) grad_x R(decode(x0_hat(x))) on an image preset: decode (the VAE) and a differentiable reward stay
in the graph. Before, DiffusionPolicy.decode ran under torch.no_grad and the term was silently zero."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from conftest import randomize_lora

from scoreaction import value_gradient
from scoreaction.config import build_config
from scoreaction.sde import alpha_bar
from scoreaction.trainer import Trainer


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A differentiable image reward: 10 x the mean pixel value (images in [0, 1])."""
    return 10.0 * images.float().mean(dim=(1, 2, 3))


@pytest.fixture
def trainer(tiny_dir, tmp_path):
    cfg = build_config(
        "tiny",
        overrides=[
            f"model.name_or_path={tiny_dir}",
            "algorithm.name=ctrl",
            "algorithm.estimator=value_gradient",
            "algorithm.kl_coef=0",
            "value.use_reward_prior=true",
            "sampler.num_steps=4",
            "sampler.batch_size=2",
            "run.num_samples=2",
            "algorithm.micro_batch_size=2",
            "run.prompts=[a photo of a cat]",
            f"run.output_dir={tmp_path}",
        ],
    )
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    randomize_lora(trainer.policy, scale=0.05)  # LoRA's B starts at zero: A would get no gradient
    trainer.learner.reward_fn = brightness
    # F_phi = 0 (its last layer zeroed): V = cos(pi t/2) R(decode(x0_hat)), all of grad_x V is the prior's
    last = trainer.value_fn.head[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    return trainer


def _value(trainer: Trainer, sub, k: int, x: torch.Tensor) -> torch.Tensor:
    """V(t_k, x) for each row, computed without autograd as the estimator defines it."""
    policy, t = trainer.policy, sub.timesteps[k]
    ab = float(alpha_bar(policy.schedule, torch.as_tensor(t)))
    eps = policy.predict_eps(x, t, sub.prompt_embeds, sub.negative_prompt_embeds, sub.guidance_scale)
    x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    r = brightness(policy.decode(x0), sub.prompts)
    tb = torch.full((x.shape[0],), float(t))
    return trainer.value_fn(tb, x, sub.prompt_embeds, r).double()


def test_grad_x_value_through_decode_matches_a_finite_difference(trainer):
    batch = trainer.rollout(0)
    sub, k = batch.traj, batch.traj.num_steps - 1  # the last state: t small, cos(pi t/2) near 1
    grad = value_gradient._grad_x_value(trainer.learner, sub, k)
    x = sub.latents[:, k].float()
    # mostly a shift of every latent (which moves the mean brightness), plus noise
    u = 1.0 + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    h = 1e-2
    with torch.no_grad():
        fd = (_value(trainer, sub, k, x + h * u) - _value(trainer, sub, k, x - h * u)) / (2 * h)
    analytic = (grad * u).flatten(1).sum(1).double()
    print(f"\ndirectional derivative of V: finite difference {fd.tolist()}, autograd {analytic.tolist()}")
    assert fd.abs().min() > 5e-3  # the reward term moves V: a zero gradient would fail below
    torch.testing.assert_close(analytic, fd, rtol=0.05, atol=1e-3)


def test_the_surrogates_gradient_carries_the_reward_term(trainer):
    """With F_phi = 0 and kl_coef = 0 the surrogate's gradient in theta is the reward prior's term alone:
    it was exactly zero while decode ran under no_grad."""
    batch = trainer.rollout(0)
    sub, k = batch.traj, batch.traj.num_steps - 1
    loss = trainer.learner.value_gradient_surrogate(sub, torch.arange(sub.batch_size), k, 1)
    loss.backward()
    norm = sum(float(p.grad.norm()) ** 2 for p in trainer.policy.trainable_parameters() if p.grad is not None)
    assert math.sqrt(norm) > 0


def test_a_non_differentiable_reward_is_said_once(trainer, caplog):
    """JPEG size has no gradient: the estimator keeps F_phi's term and says so (once)."""
    batch = trainer.rollout(0)
    trainer.learner.reward_fn = trainer.reward_fn  # the preset's jpeg_compressibility
    with caplog.at_level(logging.WARNING, logger="scoreaction.value_gradient"):
        for k in range(2):
            value_gradient._grad_x_value(trainer.learner, batch.traj, k)
    warnings = [r for r in caplog.records if "not differentiable" in r.getMessage()]
    assert len(warnings) == 1 and "jpeg_compressibility" in warnings[0].getMessage()
