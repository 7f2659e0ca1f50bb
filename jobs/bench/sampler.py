"""Suite `sampler`: our trajectory sampler against diffusers' own pipeline loop."""

from __future__ import annotations

import torch

from bench.common import Result, interleaved_median
from scoreaction.config import ModelConfig, SamplerConfig
from scoreaction.policy import DiffusionPolicy
from scoreaction.sampling import sample_trajectories


def run(repeats: int) -> list[Result]:
    """Trajectories/s of sample_trajectories (every latent + log-probs recorded) over diffusers'
    StableDiffusionPipeline(output_type="latent") with DDIMScheduler eta=1: same UNet object (LoRA attached),
    steps, batch, guidance and seed. Neither decodes: this isolates the sampler's own overhead."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny"))
    pipe = StableDiffusionPipeline(
        vae=policy.vae,
        text_encoder=policy.text_encoder,
        tokenizer=policy.tokenizer,
        unet=policy.unet,
        scheduler=DDIMScheduler.from_config(policy.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    results = []
    cases = [
        ("tiny_8x8latent", dict(batch=8, steps=50, height=None, width=None)),
        ("tiny_arch_64x64latent", dict(batch=2, steps=6, height=512, width=512)),
    ]
    for label, c in cases:
        prompts = ["a photo of a cat"] * c["batch"]
        sampler = SamplerConfig(
            num_steps=c["steps"], guidance_scale=7.5, eta=1.0, height=c["height"], width=c["width"]
        )

        def ours(prompts=prompts, sampler=sampler):
            sample_trajectories(policy, prompts, sampler, torch.Generator().manual_seed(0), decode=False)

        def theirs(prompts=prompts, c=c):
            pipe(
                prompts,
                num_inference_steps=c["steps"],
                guidance_scale=7.5,
                eta=1.0,
                output_type="latent",
                height=c["height"],
                width=c["width"],
                generator=torch.Generator().manual_seed(0),
            )

        med = interleaved_median({"ours": ours, "diffusers": theirs}, repeats)
        ours_tps, base_tps = c["batch"] / med["ours"], c["batch"] / med["diffusers"]
        results.append(
            {
                "name": f"sampler/{label}/b{c['batch']}_n{c['steps']}/trajectories_per_s",
                "value": round(ours_tps, 4),
                "unit": "traj/s",
                "baseline": round(base_tps, 4),
                "ratio": round(ours_tps / base_tps, 4),
                "target": ">= 0.95",
            }
        )
    return results
