"""Evaluate a tuned policy: reward, KL to the reference and objective at several step counts.

Library half of ``jobs/evaluate.py``; no Ray, no printing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from scoreaction.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_metadata
from scoreaction.config import Config, validate_config
from scoreaction.images import save_grid
from scoreaction.models.toy_gmm import ToyPolicy
from scoreaction.rewards import RewardFn, build_reward
from scoreaction.sampling import Policy, Trajectory, sample_trajectories

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (its latest checkpoint)."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"--checkpoint {str(p)!r} is a run folder without a complete checkpoint")
        return latest
    if not p.is_dir():
        raise CheckpointError(f"--checkpoint {str(p)!r} does not exist (expected a checkpoint or run folder)")
    return p


def policy_from_checkpoint(path: str | os.PathLike, device: str | None = None) -> tuple[Config, Policy, dict]:
    """Rebuild the run's config and policy from a checkpoint (its checkpoint.json) and load the weights."""
    from scoreaction.builders import build_policy

    ckpt = resolve_checkpoint(path)
    meta = read_metadata(ckpt)
    if not meta.get("config"):
        raise CheckpointError(f"checkpoint {str(ckpt)!r} records no run config; cannot rebuild its policy")
    data = meta["config"]
    if device is not None:
        data = {**data, "model": {**data["model"], "device": device}}
    cfg = validate_config(data)
    policy = build_policy(cfg)
    load_checkpoint(policy, ckpt)
    return cfg, policy, meta


@torch.no_grad()
def evaluate_at_steps(
    policy: Policy,
    cfg: Config,
    reward_fn: RewardFn,
    num_samples: int,
    steps: int,
    seed: int = 0,
) -> tuple[dict[str, float], Trajectory]:
    """Sample num_samples trajectories with `steps` steps (prompts round robin), recording the reference.

    Returns {reward_mean, reward_std, kl_mean, objective, num_samples, num_steps} and the trajectories.
    """
    sampler = cfg.sampler.model_copy(update={"num_steps": steps})
    prompts = [cfg.run.prompts[i % len(cfg.run.prompts)] for i in range(num_samples)]
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    bs = sampler.batch_size
    parts = [
        sample_trajectories(policy, prompts[i : i + bs], sampler, gen, record_reference=True).to("cpu")
        for i in range(0, num_samples, bs)
    ]
    traj = Trajectory.cat(parts)
    terminal = traj.images if traj.images is not None else traj.latents[:, -1]
    rewards = reward_fn(terminal, traj.prompts).float()
    kl = traj.extras["kl"].sum(1)
    metrics = {
        "num_steps": steps,
        "num_samples": num_samples,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if num_samples > 1 else 0.0,
        "kl_mean": float(kl.mean()),
        "objective": float(rewards.mean()) - cfg.algorithm.kl_coef * float(kl.mean()),
    }
    return metrics, traj


def evaluate_checkpoint(
    path: str | os.PathLike,
    num_samples: int,
    steps_list: list[int],
    output_dir: str | os.PathLike,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """Evaluate at each step count; writes samples_<steps>.npy (toy) or grid_<steps>.png (images)."""
    if num_samples < 1:
        raise ValueError(f"--num-samples={num_samples} must be >= 1")
    bad = [s for s in steps_list if not isinstance(s, int) or not 1 <= s <= 1000]
    if bad or not steps_list:
        raise ValueError(f"--num-steps={steps_list!r}: need one or more integers in [1, 1000]")
    cfg, policy, meta = policy_from_checkpoint(path, device)
    reward_fn = build_reward(cfg.reward)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for steps in steps_list:
        metrics, traj = evaluate_at_steps(policy, cfg, reward_fn, num_samples, steps, seed)
        if isinstance(policy, ToyPolicy):
            np.save(out / f"samples_{steps}.npy", traj.latents[:, -1].numpy())
        else:
            save_grid(traj.images[:16], out / f"grid_{steps}.png")
        results.append(metrics)
        logger.info("evaluated at %d steps: %s", steps, metrics)
    return {
        "checkpoint": str(resolve_checkpoint(path)),
        "step": meta.get("step"),
        "preset": cfg.model.preset,
        "results": results,
    }
