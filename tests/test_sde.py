"""The SDE core against closed forms, torch.distributions and diffusers' DDIMScheduler."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler

from scoreaction.models.presets import SD15_SCHEDULER_CONFIG
from scoreaction.sde import (
    DiscreteVPSchedule,
    LinearVPSchedule,
    alpha_bar,
    ddim_mean_std,
    eps_to_score,
    euler_maruyama_mean_std,
    gaussian_log_prob,
    heun_step,
    model_output_to_eps,
    path_kl_rate,
    score_to_eps,
    step,
    step_kl,
    step_mean_std,
    uniform_time_grid,
)
from scoreaction.toy import GaussianMixture


@pytest.fixture(scope="module")
def sd_schedule():
    return DiscreteVPSchedule.from_scheduler_config(SD15_SCHEDULER_CONFIG)


def test_discrete_schedule_hits_the_training_levels(sd_schedule):
    sched = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    i = torch.tensor([0, 1, 499, 998, 999])
    t = (i + 1).double() / 1000
    torch.testing.assert_close(alpha_bar(sd_schedule, t), sched.alphas_cumprod[i].double(), rtol=1e-6, atol=0)
    # beta(t) on (0, 1/1000]: -1000 log(1 - 0.00085) = 0.850361...
    assert float(sd_schedule.beta(torch.tensor(0.0005))) == pytest.approx(0.8503614, rel=1e-6)
    # integral of beta from 0.25 to 0.75 equals log ab(0.25) - log ab(0.75) (piecewise-linear log ab)
    ts = torch.linspace(0.25, 0.75, 500_001, dtype=torch.float64)
    integral = torch.trapezoid(sd_schedule.beta(ts), ts)
    expected = sd_schedule.log_alpha_bar(torch.tensor(0.25)) - sd_schedule.log_alpha_bar(torch.tensor(0.75))
    assert float(integral) == pytest.approx(float(expected), rel=1e-4)


def test_linear_schedule_closed_form():
    s = LinearVPSchedule(0.1, 20.0)
    # log ab(1) = -(0.1 + 19.9 / 2) = -10.05  ->  ab(1) = 4.3e-5
    assert float(s.log_alpha_bar(torch.tensor(1.0))) == pytest.approx(-10.05)
    assert float(alpha_bar(s, torch.tensor(1.0))) == pytest.approx(4.32e-5, rel=1e-2)
    assert float(s.beta(torch.tensor(0.5))) == pytest.approx(10.05)


def test_score_eps_roundtrip_and_v_prediction():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(3, 4, 2, 2, generator=g)
    ab = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)
    score = eps_to_score(eps, ab)
    # s = -eps / sqrt(1 - ab): for ab = 0.5 the factor is -sqrt(2)
    torch.testing.assert_close(score[1], -eps[1] * math.sqrt(2.0))
    torch.testing.assert_close(score_to_eps(score, ab), eps)
    # v = sqrt(ab) eps - sqrt(1 - ab) x0 with x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    x0 = torch.randn(3, 4, 2, 2, generator=g)
    a = ab.float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(model_output_to_eps(v, x_t, ab, "v_prediction"), eps, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction_type='sample'.*allowed"):
        model_output_to_eps(v, x_t, ab, "sample")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_eta1_matches_diffusers(sd_schedule, prediction_type):
    cfg = dict(SD15_SCHEDULER_CONFIG, prediction_type=prediction_type)
    sched = DDIMScheduler(**cfg)
    sched.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for tau in [int(x) for x in sched.timesteps[[0, 10, 25, 48, 49]]]:
        x_t = torch.randn(2, 4, 8, 8, generator=g)
        out = torch.randn(2, 4, 8, 8, generator=g)
        z = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(out, tau, x_t, eta=1.0, variance_noise=z).prev_sample
        t = torch.tensor((tau + 1) / 1000, dtype=torch.float64)
        prev = tau - 1000 // 50
        s = torch.tensor((prev + 1) / 1000 if prev >= 0 else 1 / 1000, dtype=torch.float64)
        eps = model_output_to_eps(out, x_t, alpha_bar(sd_schedule, t), prediction_type)
        mean, std = ddim_mean_std(sd_schedule, eps, x_t, t, s, eta=1.0)
        ours = mean + std.view(-1, 1, 1, 1) * z
        worst = max(worst, float((ours - ref).abs().max()))
    assert worst < 1e-5, worst


def test_log_prob_equals_torch_normal(sd_schedule):
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 4, 4, generator=g)
    eps = torch.randn(3, 4, 4, 4, generator=g)
    t, s = torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.48, dtype=torch.float64)
    for stepper in ("ddim", "euler_maruyama"):
        out = step(stepper, sd_schedule, eps, x_t, t, s, eta=0.7, generator=g)
        normal = torch.distributions.Normal(out.mean.double(), out.std.double().view(-1, 1, 1, 1))
        expected = normal.log_prob(out.x_next.double()).sum(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-3)
        assert out.log_prob.dtype == torch.float32


def test_gaussian_log_prob_hand_computed():
    # D = 2, x - mean = (1, 2), std = 2: -(1 + 4) / 8 - 2 log 2 - log(2 pi) = -3.8492...
    lp = gaussian_log_prob(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.tensor([2.0]))
    assert float(lp) == pytest.approx(-(5 / 8) - 2 * math.log(2) - math.log(2 * math.pi), rel=1e-6)


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_eta_outside_range_is_rejected(sd_schedule, eta):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"sampler\.eta=.*outside \[0, 1\]"):
        step_mean_std("ddim", sd_schedule, x, x, torch.tensor(0.5), torch.tensor(0.4), eta)
    with pytest.raises(ValueError, match=r"sampler\.eta=.*outside \(0, 1\]"):
        path_kl_rate(sd_schedule, torch.tensor(0.5), x, x, 0.0 if eta != eta else eta)


def test_eta_zero_is_the_deterministic_ddim_and_ode_step(sd_schedule):
    """eta = 0: std 0, x_next = mean, no density (NaN log-prob). DDIM's mean is the eta-0 DDIM update;
    Euler's mean is x + 1/2 beta (x + s) h (probability-flow ODE)."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    t, s = torch.tensor(0.5), torch.tensor(0.4)
    out = step("ddim", sd_schedule, eps, x, t, s, eta=0.0, generator=g)
    ab_t, ab_s = float(alpha_bar(sd_schedule, t)), float(alpha_bar(sd_schedule, s))
    x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    torch.testing.assert_close(
        out.x_next, math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * eps, rtol=1e-5, atol=1e-5
    )
    assert torch.isnan(out.log_prob).all() and float(out.std.abs().max()) == 0.0
    out = step("euler_maruyama", sd_schedule, eps, x, t, s, eta=0.0)
    beta = float(sd_schedule.beta(t.double()))
    score = -eps / math.sqrt(1 - ab_t)
    torch.testing.assert_close(out.x_next, x + 0.5 * beta * (x + score) * 0.1, rtol=1e-5, atol=1e-5)


def test_heun_is_second_order_on_the_gaussian_ode():
    """p_0 = N(0, v): the noised score is -x / (ab v + 1 - ab), so the probability-flow ODE is linear with the
    exact flow x_s = x_t sqrt((ab_s v + 1 - ab_s) / (ab_t v + 1 - ab_t)). Halving h cuts Heun's error ~4x."""
    sched, v = LinearVPSchedule(0.1, 20.0), 0.25

    def score_fn(x, t):
        ab = float(alpha_bar(sched, torch.as_tensor(t)))
        return -x / (ab * v + 1 - ab)

    def solve(n):
        grid = uniform_time_grid(n, 1.0, 0.05)
        x = torch.ones(1, 1)
        for k in range(n):
            x = heun_step(sched, score_fn(x, grid[k]), score_fn, x, grid[k], grid[k + 1])
        return float(x)

    ab1, ab0 = float(alpha_bar(sched, torch.tensor(1.0))), float(alpha_bar(sched, torch.tensor(0.05)))
    exact = math.sqrt((ab0 * v + 1 - ab0) / (ab1 * v + 1 - ab1))
    e1, e2 = abs(solve(20) - exact), abs(solve(40) - exact)
    print(f"\nheun error at 20 / 40 steps: {e1:.2e} / {e2:.2e} (ratio {e1 / e2:.2f})")
    assert 3.0 < e1 / e2 < 5.0


def test_unknown_stepper_and_bad_grid(sd_schedule):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(
        ValueError, match="sampler.stepper='dpm' is unknown; allowed: ddim, euler_maruyama, heun"
    ):
        step_mean_std("dpm", sd_schedule, x, x, torch.tensor(0.5), torch.tensor(0.4), 1.0)
    with pytest.raises(ValueError, match="takes two evaluations per step: use heun_step"):
        step_mean_std("heun", sd_schedule, x, x, torch.tensor(0.5), torch.tensor(0.4), 0.0)
    with pytest.raises(ValueError, match="sampler.num_steps=0 must be an integer >= 1"):
        uniform_time_grid(0)


# ------------------------------------------------------------------------------------------------
# Convergence on a 1-D Gaussian mixture with an exact noised score
# ------------------------------------------------------------------------------------------------

GMM = GaussianMixture(weights=[0.3, 0.7], means=[[-2.0], [2.0]], stds=[0.5, 0.5])
TOY_SCHEDULE = LinearVPSchedule(0.1, 20.0)


def _sample_gmm(stepper: str, num_steps: int, n: int, eta: float = 1.0, seed: int = 0, delta=None):
    """Run the sampler on the exact mixture score; optionally with a score offset delta(t, x) and the KL."""
    g = torch.Generator().manual_seed(seed)
    grid = uniform_time_grid(num_steps, 1.0, 1e-3)
    x = torch.randn(n, 1, generator=g)
    kl = torch.zeros(n)
    rate_integral = torch.zeros(n)
    for k in range(num_steps):
        t, s = grid[k], grid[k + 1]
        ab_t = alpha_bar(TOY_SCHEDULE, t)
        s_ref = GMM.score(TOY_SCHEDULE, t, x)
        s_theta = s_ref + (delta(t, x) if delta is not None else 0.0)
        mean, std = step_mean_std(stepper, TOY_SCHEDULE, score_to_eps(s_theta, ab_t), x, t, s, eta)
        if delta is not None:
            mean_ref, _ = step_mean_std(stepper, TOY_SCHEDULE, score_to_eps(s_ref, ab_t), x, t, s, eta)
            kl += step_kl(mean, mean_ref, std)
            rate_integral += path_kl_rate(TOY_SCHEDULE, t, s_theta, s_ref, eta) * float(t - s)
        x = mean + std.view(-1, 1) * torch.randn(n, 1, generator=g)
    return x, kl, rate_integral


@pytest.mark.parametrize("stepper", ["ddim", "euler_maruyama"])
def test_steppers_converge_to_the_mixture(stepper):
    n = 20_000
    errors = {}
    for steps in (10, 200):
        x, _, _ = _sample_gmm(stepper, steps, n)
        w_plus = float((x > 0).float().mean())
        errors[steps] = (abs(float(x.mean()) - float(GMM.mean())), abs(w_plus - 0.7))
    x, _, _ = _sample_gmm(stepper, 200, n)
    # mixture mean 0.3 * -2 + 0.7 * 2 = 0.8; variance 0.25 + 4 - 0.8^2 = 3.61; w+ = 0.7
    assert float(x.mean()) == pytest.approx(0.8, abs=0.04)
    assert float(x.var()) == pytest.approx(3.61, rel=0.04)
    assert float((x > 0).float().mean()) == pytest.approx(0.7, abs=0.015)
    # the per-mode spread converges to the component std 0.5
    assert float(x[x > 0].std()) == pytest.approx(0.5, abs=0.03)
    assert errors[200][0] <= errors[10][0] + 0.02


@pytest.mark.parametrize("stepper", ["ddim", "euler_maruyama"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_discrete_path_kl_converges_to_the_integral(stepper, eta):
    """Constant score offset c: the continuous KL is (1 + eta^2)^2 / (8 eta^2) c^2 [log ab(t_end) - log ab(1)]."""
    c = 0.1
    exact = (
        (1 + eta**2) ** 2
        / (8 * eta**2)
        * c**2
        * float(
            TOY_SCHEDULE.log_alpha_bar(torch.tensor(1e-3)) - TOY_SCHEDULE.log_alpha_bar(torch.tensor(1.0))
        )
    )
    gaps = []
    for steps in (10, 100, 1000):
        _, kl, _ = _sample_gmm(stepper, steps, 16, eta=eta, delta=lambda t, x: torch.full_like(x, c))
        gaps.append(abs(float(kl.mean()) - exact) / exact)
    print(f"{stepper} eta={eta}: relative gap to the continuous KL at 10/100/1000 steps: {gaps}")
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert gaps[1] / gaps[2] > 5, gaps  # first-order convergence: 10x the steps, ~10x less error
    assert gaps[-1] < 0.02, gaps


@pytest.mark.parametrize("stepper", ["ddim", "euler_maruyama"])
def test_state_dependent_path_kl_matches_its_integral(stepper):
    """Offset 0.3 tanh(x): along the policy's own paths, sum_k KL_k approaches int rate dt as steps grow."""

    def delta(t, x):
        return 0.3 * torch.tanh(x)

    gaps = []
    for steps in (20, 100, 500):
        _, kl, integral = _sample_gmm(stepper, steps, 2000, delta=delta, seed=3)
        gaps.append(abs(float(kl.mean() - integral.mean())) / float(integral.mean()))
    assert gaps[-1] < 0.02, gaps
    assert gaps[-1] <= gaps[0] + 1e-6


def test_euler_maruyama_hand_computed_step():
    # beta(0.5) = 10.05, h = 0.01, eta = 1: mean = x + (0.5 * 10.05 x + 10.05 s) h, std = sqrt(0.1005)
    x = torch.tensor([[1.0]])
    s = torch.tensor([[-2.0]])
    mean, std = euler_maruyama_mean_std(TOY_SCHEDULE, s, x, torch.tensor(0.5), torch.tensor(0.49), 1.0)
    assert float(mean) == pytest.approx(1.0 + (0.5 * 10.05 - 2 * 10.05) * 0.01, rel=1e-5)
    assert float(std) == pytest.approx(math.sqrt(0.1005), rel=1e-5)
