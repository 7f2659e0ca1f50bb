"""CTRL on the toy with a known optimum (ALGORITHM.md section 7), reduced for the default suite."""

from __future__ import annotations

import pytest
import torch

from scoreaction.config import SamplerConfig, build_config
from scoreaction.sampling import sample_trajectories
from scoreaction.trainer import Trainer

# w = (.5, .5), mu = -2, +2, std .5, a = 1, kl_coef = 2
W_PLUS, MU_MINUS, MU_PLUS, E_R, KL_STAR, J_STAR = 0.881, -1.875, 2.125, 1.648, 0.359, 0.930


def _evaluate(trainer: Trainer, steps: int, n: int = 20_000) -> dict[str, float]:
    sampler = SamplerConfig(**{**trainer.cfg.sampler.model_dump(), "num_steps": steps, "batch_size": n})
    traj = sample_trajectories(
        trainer.policy, [""] * n, sampler, torch.Generator().manual_seed(123), record_reference=True
    )
    x = traj.latents[:, -1, 0]
    r, kl = float(x.mean()), float(traj.extras["kl"].sum(1).mean())
    return {
        "w_plus": float((x > 0).float().mean()),
        "mu_minus": float(x[x < 0].mean()),
        "mu_plus": float(x[x > 0].mean()),
        "reward": r,
        "kl": kl,
        "objective": r - 2.0 * kl,
    }


def test_ctrl_ratio_approaches_the_optimum_reduced(tmp_path):
    cfg = build_config(
        "toy-gmm",
        overrides=[
            "run.epochs=30",
            "algorithm.micro_batch_size=256",
            "algorithm.learning_rate=3e-3",
            f"run.output_dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg)
    trainer.fit()
    m = _evaluate(trainer, 40)
    print(f"\nreduced toy CTRL at 40 steps: {m}")
    assert abs(m["w_plus"] - W_PLUS) <= 0.10
    assert abs(m["mu_minus"] - MU_MINUS) <= 0.15 and abs(m["mu_plus"] - MU_PLUS) <= 0.15
    assert 0.80 <= m["reward"] / E_R <= 1.15  # E_pre[r] = 0: the fraction of the gap closed
    assert abs(m["kl"] - KL_STAR) <= 0.30 * KL_STAR


@pytest.mark.parametrize("algorithm", ["ctrl", "ddpo"])
def test_without_kl_the_policy_runs_toward_argmax_r(tmp_path, algorithm):
    cfg = build_config(
        "toy-gmm",
        overrides=[
            "run.epochs=4",
            "run.num_samples=1024",
            "algorithm.kl_coef=0",
            f"algorithm.name={algorithm}",
            "algorithm.micro_batch_size=256",
            "algorithm.learning_rate=3e-3",
            f"run.output_dir={tmp_path}",
        ],
    )
    summary = Trainer(cfg).fit()
    assert summary["final"]["reward_mean"] > 2.5  # far past E*[r] = 1.648: no KL, no brake
