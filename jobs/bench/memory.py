"""Suite `memory` (slow: minutes on 2 cores): peak memory and FLOPs of SD1.5-size work on `sd15-random`.

Each measurement runs in a fresh child process, so its peak RSS (``ru_maxrss``) is its own:
  load      build the policy (SD1.5 architecture, random weights, LoRA rank 4, fp32 on CPU): the baseline
  rollout   load + one rollout: batch 1, 512 x 512 px, 2 DDIM steps, CFG 7.5, reference recorded, decoded
  learner   load + that rollout + one CTRL policy update over both steps (micro-batch 1), with gradient
            checkpointing off and on
Ratios are peak / the `load` baseline measured in the same run. FLOPs (torch.utils.flop_counter) of one
guided UNet evaluation (a batch of 2 at 64 x 64 latents) forward, and forward + backward through the LoRA.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from bench.common import Result, result

PHASES = ("load", "rollout", "learner_no_ckpt", "learner_ckpt", "flops")


def _child(phase: str) -> dict:
    import torch

    from scoreaction.builders import build_policy, build_value_function
    from scoreaction.config import build_config
    from scoreaction.learner import Batch, Learner
    from scoreaction.sampling import sample_trajectories

    torch.set_num_threads(os.cpu_count() or 1)
    overrides = [
        "model.device=cpu",
        "sampler.height=512",
        "sampler.width=512",
        "sampler.num_steps=2",
        "sampler.batch_size=1",
        "run.num_samples=1",
        "algorithm.micro_batch_size=1",
        "algorithm.updates_per_epoch=1",
        f"policy.gradient_checkpointing={phase == 'learner_ckpt'}",
    ]
    cfg = build_config("sd15-random", overrides=overrides)
    policy = build_policy(cfg)
    out: dict = {}
    if phase == "flops":
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.randn(1, *policy.latent_shape(512, 512))
        emb = policy.encode_prompts(["a photo of a cat"])
        neg = policy.encode_prompts([""])
        t = torch.tensor(0.5, dtype=torch.float64)
        with FlopCounterMode(display=False) as fwd, torch.no_grad():
            policy.predict_eps(x, t, emb, neg, 7.5)
        with FlopCounterMode(display=False) as both:
            policy.predict_eps(x, t, emb, neg, 7.5).square().mean().backward()
        out = {"forward_flops": fwd.get_total_flops(), "forward_backward_flops": both.get_total_flops()}
    elif phase != "load":
        traj = sample_trajectories(
            policy, ["a photo of a cat"], cfg.sampler, torch.Generator().manual_seed(0), record_reference=True
        )
        if phase.startswith("learner"):
            learner = Learner(policy, build_value_function(cfg, policy), cfg)
            learner.update_policy(Batch(traj, torch.zeros(1)))
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return out


def _measure(phase: str) -> dict:
    jobs = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{jobs.parent}{os.pathsep}{jobs}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", phase], env=env, cwd=jobs, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory phase {phase!r} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(repeats: int) -> list[Result]:
    m = {phase: _measure(phase) for phase in PHASES}
    base = m["load"]["peak_rss_gb"]
    results = [result("memory/sd15_random/load_lora_r4/peak_rss", base, "GB", base, "report")]
    for phase in ("rollout", "learner_no_ckpt", "learner_ckpt"):
        results.append(
            result(f"memory/sd15_random/{phase}/peak_rss", m[phase]["peak_rss_gb"], "GB", base, "report")
        )
    results.append(
        result(
            "memory/sd15_random/learner/ckpt_vs_no_ckpt_peak_rss",
            m["learner_ckpt"]["peak_rss_gb"],
            "GB",
            m["learner_no_ckpt"]["peak_rss_gb"],
            "< 1",
        )
    )
    f = m["flops"]
    results.append(
        result(
            "memory/sd15_random/unet_cfg_b2_64x64/forward_backward_vs_forward_flops",
            f["forward_backward_flops"] / 1e12,
            "TFLOP",
            f["forward_flops"] / 1e12,
            "report",
        )
    )
    return results


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1])))
