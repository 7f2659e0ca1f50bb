"""Continuous-time VP SDE core: schedules, score <-> epsilon, guidance, steppers with exact log-probs.

Notation (README.md, "The method in code", derives the method in it):

    t in [0, 1]            noise level; t = 0 is data, t = 1 is (almost) pure noise
    alpha_bar(t)           signal fraction; x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps
    beta(t) = g(t)^2       = -d log alpha_bar(t) / dt
    s(t, x)                score = -eps / sqrt(1 - alpha_bar(t))
    eta in (0, 1]          member of the reverse-process family; eta = 1 is the reverse-time SDE
    reverse process        dX = [-beta X / 2 - (1 + eta^2) / 2 beta s] dt + eta sqrt(beta) dB   (dt < 0)

Generation runs t from 1 down to 0. A step goes from t (noisier) to s (less noisy). Every transition is
Gaussian, x_next ~ N(mean, std^2 I), and its log-density is computed in float32 whatever the model's
dtype. This module is pure tensor code: no Ray, no I/O, no globals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

PredictionType = Literal["epsilon", "v_prediction"]
StepperName = Literal["ddim", "euler_maruyama", "heun"]
STEPPERS: tuple[str, ...] = ("ddim", "euler_maruyama", "heun")


# --------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------


class VPSchedule(Protocol):
    """A variance-preserving noise schedule in continuous time."""

    def log_alpha_bar(self, t: Tensor) -> Tensor: ...

    def beta(self, t: Tensor) -> Tensor: ...


class DiscreteVPSchedule:
    """Continuous alpha_bar(t) from a model's discrete DDPM betas (SD1.5: 1000 scaled_linear steps).

    Discrete step i (0-based) sits at t_i = (i + 1) / T; log alpha_bar is interpolated linearly between
    the T points, with log alpha_bar(0) = 0 prepended. beta(t) is the slope, constant on each interval,
    so that integral_s^t beta = log alpha_bar(s) - log alpha_bar(t) holds exactly.
    """

    def __init__(self, betas: Tensor) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"betas must be a 1-D sequence of values in (0, 1), got {betas.numel()} values")
        self.num_train_timesteps = int(betas.numel())
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # (T,) float64
        # knots: (T + 1,) including t = 0
        self._t = (
            torch.arange(0, self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        )
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])
        self._slope = (
            -(self._log_ab[1:] - self._log_ab[:-1]) * self.num_train_timesteps
        )  # (T,) beta per interval

    @classmethod
    def from_scheduler_config(cls, config: dict) -> DiscreteVPSchedule:
        """Build from a diffusers scheduler config (``linear`` or ``scaled_linear`` betas)."""
        kind = config.get("beta_schedule", "linear")
        n = int(config.get("num_train_timesteps", 1000))
        b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        else:
            raise ValueError(
                f"scheduler beta_schedule={kind!r} is not supported; allowed: 'linear', 'scaled_linear'"
            )
        return cls(betas)

    def _index(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64).clamp(0.0, 1.0)
        return (t64 * self.num_train_timesteps).ceil().long().clamp(1, self.num_train_timesteps) - 1

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)
        i = self._index(t64)
        return self._log_ab[i] - self._slope[i] * (t64 - self._t[i])

    def beta(self, t: Tensor) -> Tensor:
        return self._slope[self._index(torch.as_tensor(t, dtype=torch.float64))]

    def model_timestep(self, t: Tensor) -> Tensor:
        """The network's (possibly fractional) discrete timestep for continuous t: tau = t T - 1."""
        return torch.as_tensor(t, dtype=torch.float64) * self.num_train_timesteps - 1.0


class LinearVPSchedule:
    """beta(t) = beta_min + t (beta_max - beta_min) in closed form (the toy's schedule; 0.1 -> 20)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"need 0 < beta_min <= beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64)
        return -(self.beta_min * t64 + 0.5 * (self.beta_max - self.beta_min) * t64**2)

    def beta(self, t: Tensor) -> Tensor:
        t64 = torch.as_tensor(t, dtype=torch.float64)
        return self.beta_min + t64 * (self.beta_max - self.beta_min)


def alpha_bar(schedule: VPSchedule, t: Tensor) -> Tensor:
    """alpha_bar(t) in float64."""
    return torch.exp(schedule.log_alpha_bar(t))


# --------------------------------------------------------------------------------------------------
# Parameterisations: epsilon, v, score, guidance
# --------------------------------------------------------------------------------------------------


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """Per-sample (B,) or scalar coefficient -> broadcastable to like: (B, ...), in like's dtype."""
    v = torch.as_tensor(v, device=like.device).to(like.dtype)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() > 0 else v


def _per_sample(v: Tensor, batch: int, device: torch.device) -> Tensor:
    """Scalar or (B,) float64 -> (B,) float64 on device."""
    v = torch.as_tensor(v, dtype=torch.float64)
    return (v.expand(batch) if v.dim() == 0 else v).to(device)


def model_output_to_eps(output: Tensor, x_t: Tensor, ab_t: Tensor, prediction_type: PredictionType) -> Tensor:
    """Network output -> epsilon.

    v-prediction: v = sqrt(ab) eps - sqrt(1 - ab) x_0, hence eps = sqrt(ab) v + sqrt(1 - ab) x_t.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        ab = _bcast(ab_t, x_t)
        return ab.sqrt() * output + (1 - ab).sqrt() * x_t
    raise ValueError(
        f"prediction_type={prediction_type!r} is not supported; allowed: 'epsilon', 'v_prediction'"
    )


def eps_to_score(eps: Tensor, ab_t: Tensor) -> Tensor:
    """s = -eps / sqrt(1 - alpha_bar(t))."""
    return -eps / _bcast(1 - torch.as_tensor(ab_t), eps).sqrt()


def score_to_eps(score: Tensor, ab_t: Tensor) -> Tensor:
    """eps = -sqrt(1 - alpha_bar(t)) s."""
    return -score * _bcast(1 - torch.as_tensor(ab_t), score).sqrt()


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """eps = eps_u + w (eps_c - eps_u); linear, so the guided score is guided the same way."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


# --------------------------------------------------------------------------------------------------
# Gaussian transitions
# --------------------------------------------------------------------------------------------------


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x_next; mean, std^2 I) per sample, float32.

    x_next, mean: (B, ...); std: (B,) or scalar. Returns (B,):
        -||x_next - mean||^2 / (2 std^2) - D log std - D/2 log(2 pi),  D = numel per sample.
    """
    x_next, mean = x_next.float(), mean.float()
    std = torch.as_tensor(std, device=x_next.device).float()
    dims = tuple(range(1, x_next.dim()))
    d = x_next[0].numel()
    std_b = std.expand(x_next.shape[0]) if std.dim() == 0 else std
    sq = ((x_next - mean) ** 2).sum(dim=dims)
    return -sq / (2 * std_b**2) - d * torch.log(std_b) - 0.5 * d * math.log(2 * math.pi)


@dataclass
class StepOutput:
    """One transition x_t -> x_next ~ N(mean, std^2 I).

    x_next, mean: (B, ...) float32; std: (B,) float32; log_prob: (B,) float32.
    """

    x_next: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def _check_eta(eta: float, allow_zero: bool = False) -> None:
    lo_ok = eta >= 0.0 if allow_zero else eta > 0.0
    if not (isinstance(eta, int | float) and math.isfinite(eta) and lo_ok and eta <= 1.0):
        allowed = "[0, 1]" if allow_zero else "(0, 1]: a stochastic stepper needs eta > 0"
        raise ValueError(f"sampler.eta={eta!r} is outside {allowed}")


def x0_hat(x_t: Tensor, eps: Tensor, ab_t: Tensor | float) -> Tensor:
    """Tweedie / DDIM estimate of the data x_0 from the state x_t and the predicted noise eps:

        x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)

    ab_t = alpha_bar(t): a number, or a tensor that broadcasts against x_t (shape it: (B, 1, 1, 1) for a batch
    of states, (1, N, 1, 1, 1) for the N states of trajectories). The sampler's DDIM step, the value function's
    reward prior and the value gradient all use this one formula."""
    ab_t = torch.as_tensor(ab_t, device=x_t.device)  # coefficients in ab_t's precision, then x_t's dtype
    return (x_t - (1 - ab_t).sqrt().to(x_t.dtype) * eps) / ab_t.sqrt().to(x_t.dtype)


def ddim_mean_std(
    schedule: VPSchedule, eps: Tensor, x_t: Tensor, t: Tensor, s: Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    """DDIM-eta transition t -> s (s < t) as (mean (B, ...) float32, std (B,) float32).

        x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)                       (Tweedie / DDIM estimate)
        sigma  = eta * sqrt((1 - ab_s) / (1 - ab_t)) * sqrt(1 - ab_t / ab_s)    ("std_dev_t" in diffusers)
        mean   = sqrt(ab_s) x0_hat + sqrt(1 - ab_s - sigma^2) eps
    eta = 1 is DDPM ancestral sampling. t, s: scalars or (B,).
    """
    x_t, eps = x_t.float(), eps.float()
    b = x_t.shape[0]
    ab_t = _per_sample(alpha_bar(schedule, torch.as_tensor(t)), b, x_t.device)
    ab_s = _per_sample(alpha_bar(schedule, torch.as_tensor(s)), b, x_t.device)
    # 1. std (float64 coefficients, then float32)
    var = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    sigma = var.sqrt()
    # 2. predicted x_0, 3. direction pointing to x_t, 4. mean
    x0 = x0_hat(x_t, eps, ab_t.reshape(-1, *(1,) * (x_t.dim() - 1)))
    dir_xt = _bcast((1 - ab_s - var).clamp_min(0).sqrt(), x_t) * eps
    mean = _bcast(ab_s.sqrt(), x_t) * x0 + dir_xt
    return mean, sigma.float()


def euler_maruyama_mean_std(
    schedule: VPSchedule, score: Tensor, x_t: Tensor, t: Tensor, s: Tensor, eta: float
) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama on the eta-family reverse SDE, step h = t - s > 0 (time runs backwards).

    mean  = x_t + [1/2 beta(t) x_t + (1 + eta^2)/2 beta(t) s(t, x_t)] h
    sigma = eta sqrt(beta(t) h)
    """
    x_t, score = x_t.float(), score.float()
    b = x_t.shape[0]
    t64 = torch.as_tensor(t, dtype=torch.float64)
    h = _per_sample(t64 - torch.as_tensor(s, dtype=torch.float64), b, x_t.device)
    beta = _per_sample(schedule.beta(t64), b, x_t.device)
    mean = x_t + _bcast(0.5 * beta * h, x_t) * x_t + _bcast(0.5 * (1 + eta**2) * beta * h, x_t) * score
    sigma = eta * (beta * h).sqrt()
    return mean, sigma.float()


def sample_or_score(
    mean: Tensor, std: Tensor, x_next: Tensor | None = None, generator: torch.Generator | None = None
) -> StepOutput:
    """Draw x_next ~ N(mean, std^2 I) (or take the given one) and return it with its exact log-prob.

    std = 0 (a deterministic step, eta = 0): x_next = mean and the log-prob is NaN (there is no density)."""
    if bool((torch.as_tensor(std) == 0).all()):
        if x_next is None:
            x_next = mean
        nan = torch.full((mean.shape[0],), float("nan"), device=mean.device)
        return StepOutput(x_next=x_next.float(), mean=mean, std=std, log_prob=nan)
    if x_next is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=torch.float32)
        x_next = mean + _bcast(std, mean) * noise
    x_next = x_next.float()
    return StepOutput(x_next=x_next, mean=mean, std=std, log_prob=gaussian_log_prob(x_next, mean, std))


def step_mean_std(
    stepper: StepperName,
    schedule: VPSchedule,
    eps: Tensor,
    x_t: Tensor,
    t: Tensor,
    s: Tensor,
    eta: float,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the transition t -> s of a one-evaluation stepper, given the (guided) epsilon.

    eta = 0 gives the deterministic member (std 0): DDIM's ODE step, or Euler on the probability-flow ODE.
    The two-evaluation ``heun`` stepper is driven by the sampler (see ``heun_step``)."""
    _check_eta(eta, allow_zero=True)
    if stepper == "ddim":
        return ddim_mean_std(schedule, eps, x_t, t, s, eta)
    if stepper == "euler_maruyama":
        ab_t = alpha_bar(schedule, torch.as_tensor(t)).to(x_t.device)
        return euler_maruyama_mean_std(schedule, eps_to_score(eps.float(), ab_t), x_t, t, s, eta)
    if stepper == "heun":
        raise ValueError("sampler.stepper='heun' takes two evaluations per step: use heun_step")
    raise ValueError(f"sampler.stepper={stepper!r} is unknown; allowed: {', '.join(STEPPERS)}")


def pf_ode_velocity(schedule: VPSchedule, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
    """dx / d(-t) of the probability-flow ODE (eta = 0): 1/2 beta(t) x + 1/2 beta(t) s(t, x), float32."""
    b = x.shape[0]
    beta = _per_sample(schedule.beta(torch.as_tensor(t, dtype=torch.float64)), b, x.device)
    return _bcast(0.5 * beta, x) * (x.float() + score.float())


def heun_step(
    schedule: VPSchedule,
    score_t: Tensor,
    score_fn: Callable[[Tensor, Tensor], Tensor],
    x_t: Tensor,
    t: Tensor,
    s: Tensor,
) -> Tensor:
    """One second-order (Heun / improved Euler) step t -> s of the probability-flow ODE, deterministic:

        v1 = f(t, x_t),  x_e = x_t + h v1,  v2 = f(s, x_e),  x_s = x_t + h (v1 + v2) / 2,   h = t - s
    score_t: the (guided) score at (t, x_t); score_fn(x, t) -> the score at (t, x) (the second
    evaluation). Returns x_s (B, ...) float32.
    """
    h = float(torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(s, dtype=torch.float64))
    v1 = pf_ode_velocity(schedule, score_t, x_t, t)
    x_e = x_t.float() + h * v1
    v2 = pf_ode_velocity(schedule, score_fn(x_e, s), x_e, s)
    return x_t.float() + 0.5 * h * (v1 + v2)


def ode_step_kl(schedule: VPSchedule, t: Tensor, s: Tensor, score_theta: Tensor, score_ref: Tensor) -> Tensor:
    """KL of step t -> s for deterministic rollouts, (B,) float32: the continuous path-KL rate of the
    reverse SDE (eta = 1, the process the policy defines) times the step, 1/2 g(t)^2 ||s_theta - s_ref||^2 h.
    A deterministic step has no transition density, so the exact Gaussian KL_k does not exist."""
    h = float(torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(s, dtype=torch.float64))
    return path_kl_rate(schedule, t, score_theta, score_ref, 1.0) * h


def step(
    stepper: StepperName,
    schedule: VPSchedule,
    eps: Tensor,
    x_t: Tensor,
    t: Tensor,
    s: Tensor,
    eta: float,
    x_next: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One step t -> s: the next state (sampled, or the given x_next), mean, std, log-prob (NaN if eta = 0)."""
    mean, std = step_mean_std(stepper, schedule, eps, x_t, t, s, eta)
    return sample_or_score(mean, std, x_next=x_next, generator=generator)


# --------------------------------------------------------------------------------------------------
# Path KL between two policies (same diffusion, different drifts)
# --------------------------------------------------------------------------------------------------


def step_kl(mean_theta: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """Exact KL of one Gaussian transition: KL_k = ||mu_theta - mu_ref||^2 / (2 sigma_k^2), (B,) float32."""
    diff = (mean_theta.float() - mean_ref.float()).flatten(1)
    std = torch.as_tensor(std, device=diff.device).float()
    return (diff**2).sum(dim=1) / (2 * std**2)


def path_kl_rate(
    schedule: VPSchedule, t: Tensor, score_theta: Tensor, score_ref: Tensor, eta: float
) -> Tensor:
    """Integrand of the continuous path KL at time t, (B,) float32:

        (1 + eta^2)^2 / (8 eta^2) * g(t)^2 * ||s_theta - s_ref||^2
    The path KL is the integral of this over t in [0, 1] (for eta = 1: 1/2 g^2 ||s_theta - s_ref||^2).
    """
    _check_eta(eta)
    g2 = schedule.beta(torch.as_tensor(t, dtype=torch.float64)).float().to(score_theta.device)
    sq = ((score_theta.float() - score_ref.float()).flatten(1) ** 2).sum(dim=1)
    return (1 + eta**2) ** 2 / (8 * eta**2) * g2 * sq


def uniform_time_grid(num_steps: int, t_start: float = 1.0, t_end: float = 1e-3) -> Tensor:
    """t_0 = t_start > t_1 > ... > t_N = t_end, evenly spaced: (N + 1,) float64."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"sampler.num_steps={num_steps!r} must be an integer >= 1")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64)
