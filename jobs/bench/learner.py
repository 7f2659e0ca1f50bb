"""Suite `learner`: throughput of the learner's policy step against a plain PyTorch forward+backward loop.

Both sides train the same LoRA UNet on the same trajectories (every step of every sample, guidance on, so
each (timestep, sample) pair is one doubled-batch UNet forward and backward) and take one optimiser step
per micro-batch. The learner additionally evaluates the Gaussian transition, its log-prob, the clipped
ratio, the KL penalty and the gradient-norm clip: what the ratio measures is the cost of that math.
"""

from __future__ import annotations

import torch

from bench.common import Result, interleaved_median, result
from scoreaction.builders import build_policy, build_value_function
from scoreaction.config import build_config
from scoreaction.learner import Batch, Learner
from scoreaction.sampling import sample_trajectories

CASES = [
    # (label, overrides): tiny at its own size, and the tiny architecture at 512 px (64x64 latents)
    ("tiny_8x8latent", ["sampler.num_steps=4", "run.num_samples=8"]),
    (
        "tiny_arch_64x64latent",
        ["sampler.num_steps=2", "run.num_samples=2", "sampler.height=512", "sampler.width=512"],
    ),
]


def _case(overrides: list[str], repeats: int) -> tuple[float, float, int]:
    cfg = build_config(
        "tiny",
        overrides=[
            *overrides,
            "algorithm.name=ctrl",
            "algorithm.kl_coef=0.01",
            "algorithm.timestep_fraction=1.0",
            "algorithm.updates_per_epoch=1",
            "algorithm.micro_batch_size=64",
            "value.use_reward_prior=false",  # the learner step alone: no reward model in the loop
        ],
    )
    policy = build_policy(cfg)
    value_fn = build_value_function(cfg, policy)
    learner = Learner(policy, value_fn, cfg)
    prompts = [cfg.run.prompts[i % len(cfg.run.prompts)] for i in range(cfg.run.num_samples)]
    traj = sample_trajectories(
        policy, prompts, cfg.sampler, torch.Generator().manual_seed(0), decode=False, record_reference=True
    )
    batch = Batch(traj, torch.randn(traj.batch_size, generator=torch.Generator().manual_seed(1)))
    pairs = traj.batch_size * traj.num_steps
    params = policy.trainable_parameters()
    plain_opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    emb = torch.cat([traj.negative_prompt_embeds, traj.prompt_embeds])

    def ours() -> None:
        learner.update_policy(batch)

    def plain() -> None:
        plain_opt.zero_grad(set_to_none=True)
        for k in range(traj.num_steps):
            x = traj.latents[:, k]
            t = policy.schedule.model_timestep(traj.timesteps[k]).float()
            out = policy.unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
            out.float().pow(2).mean().backward()
        plain_opt.step()

    med = interleaved_median({"ours": ours, "plain": plain}, repeats)
    return pairs / med["ours"], pairs / med["plain"], pairs


def run(repeats: int) -> list[Result]:
    results = []
    for label, overrides in CASES:
        ours, plain, pairs = _case(overrides, repeats)
        results.append(
            result(f"learner/{label}/{pairs}_pairs/pairs_per_s", ours, "pairs/s", plain, ">= 0.85")
        )
    return results
