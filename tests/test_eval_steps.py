"""The path KL as a continuous-time integral (``extras['kl_continuous']``, logged as
``eval/steps_<N>/kl_continuous``): it converges as the step count N grows, and agrees across N where the
discrete per-step KL of a DDIM chain does not; the per-epoch evaluation set is fixed."""

from __future__ import annotations

import pytest
import torch

from scoreaction.builders import build_policy
from scoreaction.config import ConfigError, build_config
from scoreaction.rollouts import sample_batch

STEPS = (20, 40, 80, 160)


@pytest.fixture(scope="module")
def estimates() -> dict[int, tuple[float, float]]:
    """(continuous, discrete) path KL of a toy policy away from the reference, DDIM eta = 1, per N."""
    cfg = build_config("toy-gmm", overrides=["sampler.stepper=ddim", "sampler.batch_size=2048"])
    policy = build_policy(cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.correction.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = {}
    for n in STEPS:
        traj = sample_batch(policy, cfg, 0, 0, [""] * 2048, num_steps=n)
        out[n] = (float(traj.extras["kl_continuous"].sum(1).mean()), float(traj.extras["kl"].sum(1).mean()))
    return out


def test_kl_continuous_converges_as_the_step_count_grows(estimates):
    cont = {n: c for n, (c, _) in estimates.items()}
    print("\ncontinuous path KL per N:", cont, "discrete:", {n: d for n, (_, d) in estimates.items()})
    assert all(c > 0 for c in cont.values())
    # every grid estimates the same integral: within 10% of the finest
    for n in STEPS:
        assert cont[n] == pytest.approx(cont[STEPS[-1]], rel=0.1), n
    # and the coarsest is the farthest from it
    assert abs(cont[STEPS[0]] - cont[STEPS[-1]]) >= abs(cont[STEPS[-2]] - cont[STEPS[-1]])


def test_the_discrete_kl_of_a_ddim_chain_depends_on_the_step_count_the_continuous_one_does_not(estimates):
    cont, disc = {n: c for n, (c, _) in estimates.items()}, {n: d for n, (_, d) in estimates.items()}
    assert disc[20] > 1.5 * cont[20]  # 20 DDIM steps: the per-step KLs overstate the path KL
    assert disc[160] == pytest.approx(cont[160], rel=0.1)  # they meet as N grows
    assert disc[20] - cont[20] > disc[40] - cont[40] > disc[160] - cont[160]


def test_the_evaluation_set_starts_from_the_same_noise_at_every_step_count():
    cfg = build_config("toy-gmm", overrides=["sampler.batch_size=8"])
    policy = build_policy(cfg)
    a = sample_batch(policy, cfg, -(1 << 19), 0, [""] * 8, num_steps=5)
    b = sample_batch(policy, cfg, -(1 << 19), 0, [""] * 8, num_steps=9)
    assert torch.equal(a.latents[:, 0], b.latents[:, 0]) and a.num_steps == 5 and b.num_steps == 9


@pytest.mark.parametrize(
    "override, match",
    [
        ("run.eval_num_steps=[0]", r"run.eval_num_steps.0=0: .*greater than or equal to 1"),
        ("run.eval_every=0", r"run.eval_every=0: .*greater than or equal to 1"),
        ("run.eval_num_samples=0", r"run.eval_num_samples=0"),
    ],
)
def test_evaluation_settings_are_checked(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config("toy-gmm", overrides=[override])
