"""Rollouts: prompts -> trajectories with every latent and the exact log-probability of every step.

States are named by their time, as x_t is: a trajectory of N steps visits x_{t_0} (the starting noise,
t_0 ~ 1) ... x_{t_N} (the sample, t_N ~ 0); x_0 is always data (what x0_hat estimates), never the starting
noise. Step k is the Gaussian transition x_{t_k} -> x_{t_{k+1}} under the policy, with
log p_theta(x_{t_{k+1}} | x_{t_k}) stored in float32.
Re-evaluating a stored transition with the same parameters runs the very same computation, so the
on-policy importance ratio is exactly 1 for the same batch (see tests/test_sampling.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from scoreaction.config import SamplerConfig
from scoreaction.models.toy_gmm import ToyPolicy
from scoreaction.policy import DiffusionPolicy
from scoreaction.sde import (
    StepOutput,
    alpha_bar,
    eps_to_score,
    heun_step,
    ode_step_kl,
    path_kl_rate,
    sample_or_score,
    step_kl,
    step_mean_std,
)

Policy = DiffusionPolicy | ToyPolicy


@dataclass
class Trajectory:
    """A batch of B trajectories of N steps (CPU or device tensors).

    latents: (B, N + 1, C, h, w) float32    x_{t_0} (the starting noise) ... x_{t_N} (the sample)
    timesteps: (N + 1,) float64             t_0 > ... > t_N
    log_probs: (B, N) float32               log p_old(x_{t_{k+1}} | x_{t_k})
    prompt_embeds: (B, L, D)                text-encoder states of the prompts
    negative_prompt_embeds: (B, L, D) | None  unconditional branch (None without guidance)
    images: (B, 3, H, W) float32 in [0, 1] | None   decoded x_{t_N}
    """

    latents: Tensor
    timesteps: Tensor
    log_probs: Tensor
    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None
    images: Tensor | None
    prompts: list[str]
    stepper: str
    eta: float
    guidance_scale: float
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    def _map(self, fn_batch, fn_shared) -> Trajectory:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "timesteps":
                out[f.name] = fn_shared(v)
            elif f.name == "prompts":
                out[f.name] = fn_batch(v)
            elif f.name == "extras":
                out[f.name] = {k: fn_batch(t) for k, t in v.items()}
            elif isinstance(v, Tensor):
                out[f.name] = fn_batch(v)
            else:
                out[f.name] = v
        return Trajectory(**out)

    def to(self, device: str | torch.device) -> Trajectory:
        return self._map(lambda v: v.to(device) if isinstance(v, Tensor) else v, lambda v: v)

    def index(self, idx: Tensor | list[int] | slice) -> Trajectory:
        """Sub-batch by indices along B."""

        def take(v):
            if isinstance(v, Tensor):
                return v[idx]
            ids = range(len(v))[idx] if isinstance(idx, slice) else [int(i) for i in idx]
            return [v[i] for i in ids]

        return self._map(take, lambda v: v)

    @staticmethod
    def cat(items: list[Trajectory]) -> Trajectory:
        first = items[0]
        for other in items[1:]:
            if not torch.equal(other.timesteps, first.timesteps):
                raise ValueError("cannot concatenate trajectories sampled on different time grids")
        out = {}
        for f in fields(first):
            vals = [getattr(t, f.name) for t in items]
            if f.name == "timesteps":
                out[f.name] = first.timesteps
            elif f.name == "prompts":
                out[f.name] = [p for v in vals for p in v]
            elif f.name == "extras":
                out[f.name] = {k: torch.cat([v[k] for v in vals]) for k in first.extras}
            elif isinstance(vals[0], Tensor):
                out[f.name] = torch.cat(vals)
            else:
                out[f.name] = vals[0]
        return Trajectory(**out)


def _validate(sampler: SamplerConfig) -> None:
    # The pydantic model validates on construction; this guards callers that bypass it.
    if not isinstance(sampler.num_steps, int) or sampler.num_steps < 1:
        raise ValueError(f"sampler.num_steps={sampler.num_steps!r} must be an integer >= 1")
    if not 0.0 <= sampler.eta <= 1.0:
        raise ValueError(f"sampler.eta={sampler.eta!r} is outside [0, 1]")
    if sampler.stepper == "heun" and sampler.eta != 0:
        raise ValueError(
            f"sampler.eta={sampler.eta!r}: the heun stepper is deterministic (probability-flow ODE); set eta=0"
        )


def is_deterministic(stepper: str, eta: float) -> bool:
    """Deterministic rollouts (eta = 0, or the heun ODE stepper) have no transition log-probs."""
    return eta == 0 or stepper == "heun"


def _guided(sampler: SamplerConfig) -> bool:
    return sampler.guidance_scale > 1.0


@torch.no_grad()
def sample_trajectories(
    policy: Policy,
    prompts: list[str],
    sampler: SamplerConfig,
    generator: torch.Generator | None = None,
    decode: bool = True,
    noise: Tensor | None = None,
    record_reference: bool = False,
) -> Trajectory:
    """Sample len(prompts) trajectories in one batch.

    Noise comes from generator in the order diffusers' StableDiffusionPipeline draws it (the starting noise,
    then one draw per step), so with the same seed and eta=1 DDIM both give the same images.
    noise: optional starting noise x_{t_0} (B, C, h, w); drawn from generator when None.
    record_reference: also evaluate the reference policy at every state and store in ``extras``:
        eps (B, N, ...) the guided policy epsilon, mean_ref (B, N, ...) the reference transition mean,
        kl (B, N) the exact per-step KL_k = ||mean_theta - mean_ref||^2 / (2 sigma_k^2), and
        kl_continuous (B, N) the path KL's continuous-time integrand at t_k times the step (``sde.path_kl_rate``
        of the sampler's eta-SDE): summed over k, a Riemann estimate of the path KL that converges as N grows,
        so it compares step counts (the discrete KL_k overstates the continuous rate by a step-dependent amount).
    Deterministic samplers (eta = 0, heun) store NaN log-probs, no mean_ref, and as kl the continuous
    path-KL rate of the reverse SDE times the step (``sde.ode_step_kl``).
    """
    _validate(sampler)
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    dev = policy.device
    b = len(prompts)
    t_grid = policy.time_grid(sampler.num_steps)
    prompt_embeds = policy.encode_prompts(prompts)
    negative = policy.encode_prompts([sampler.negative_prompt] * b) if _guided(sampler) else None
    if noise is None:
        shape = policy.latent_shape(sampler.height, sampler.width)
        noise = torch.randn((b, *shape), generator=generator, device=dev, dtype=torch.float32)
    x = noise.to(dev, torch.float32)
    all_latents = torch.empty((b, sampler.num_steps + 1, *x.shape[1:]), device=dev, dtype=torch.float32)
    all_latents[:, 0] = x
    log_probs = torch.empty((b, sampler.num_steps), device=dev, dtype=torch.float32)
    deterministic = is_deterministic(sampler.stepper, sampler.eta)
    extras: dict[str, Tensor] = {}
    if record_reference:
        extras = {
            "eps": torch.empty_like(all_latents[:, 1:]),
            "kl": torch.empty((b, sampler.num_steps), device=dev, dtype=torch.float32),
            "kl_continuous": torch.empty((b, sampler.num_steps), device=dev, dtype=torch.float32),
        }
        if not deterministic:
            extras["mean_ref"] = torch.empty_like(all_latents[:, 1:])

    def score(x_: Tensor, t_: Tensor) -> Tensor:
        eps_ = policy.predict_eps(x_, t_, prompt_embeds, negative, sampler.guidance_scale)
        return eps_to_score(eps_.float(), alpha_bar(policy.schedule, torch.as_tensor(t_)).to(dev))

    for k in range(sampler.num_steps):
        t, s = t_grid[k], t_grid[k + 1]
        eps = policy.predict_eps(x, t, prompt_embeds, negative, sampler.guidance_scale)
        if sampler.stepper == "heun":
            ab_t = alpha_bar(policy.schedule, torch.as_tensor(t)).to(dev)
            out = StepOutput(
                x_next=heun_step(policy.schedule, eps_to_score(eps.float(), ab_t), score, x, t, s),
                mean=x,
                std=torch.zeros(b, device=dev),
                log_prob=torch.full((b,), float("nan"), device=dev),
            )
        else:
            mean, std = step_mean_std(sampler.stepper, policy.schedule, eps, x, t, s, sampler.eta)
            out = sample_or_score(mean, std, generator=generator)
        if record_reference:
            with policy.reference():
                eps_ref = policy.predict_eps(x, t, prompt_embeds, negative, sampler.guidance_scale)
            extras["eps"][:, k] = eps
            ab_t = alpha_bar(policy.schedule, torch.as_tensor(t)).to(dev)
            score_theta, score_ref = eps_to_score(eps.float(), ab_t), eps_to_score(eps_ref.float(), ab_t)
            # the path KL's continuous-time integrand at t_k times the step (comparable across step counts)
            h = float(torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(s, dtype=torch.float64))
            eta = sampler.eta if sampler.eta > 0 else 1.0  # deterministic: the reverse SDE's (eta = 1)
            extras["kl_continuous"][:, k] = path_kl_rate(policy.schedule, t, score_theta, score_ref, eta) * h
            if deterministic:
                extras["kl"][:, k] = ode_step_kl(policy.schedule, t, s, score_theta, score_ref)
            else:
                mean_ref, _ = step_mean_std(sampler.stepper, policy.schedule, eps_ref, x, t, s, sampler.eta)
                extras["mean_ref"][:, k] = mean_ref
                extras["kl"][:, k] = step_kl(out.mean, mean_ref, out.std)
        x = out.x_next
        all_latents[:, k + 1] = x
        log_probs[:, k] = out.log_prob
    images = policy.decode(x) if decode else None
    return Trajectory(
        latents=all_latents,
        timesteps=t_grid,
        log_probs=log_probs,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        images=images,
        prompts=list(prompts),
        stepper=sampler.stepper,
        eta=sampler.eta,
        guidance_scale=sampler.guidance_scale,
        extras=extras,
    )


def transition(policy: Policy, traj: Trajectory, k: int) -> StepOutput:
    """Re-evaluate step k (x_{t_k} -> x_{t_{k+1}}) of stored trajectories under the current parameters.

    Differentiable in the policy's trainable parameters. Returns mean, std and
    log p_theta(x_{t_{k+1}} | x_{t_k}).
    """
    if not 0 <= k < traj.num_steps:
        raise IndexError(f"step index k={k} is outside [0, {traj.num_steps})")
    if is_deterministic(traj.stepper, traj.eta):
        raise ValueError(
            f"trajectories sampled with stepper={traj.stepper!r}, eta={traj.eta} are deterministic: a step has "
            "no transition density, so there is no log-prob to re-evaluate (use the value_gradient estimator)"
        )
    dev = policy.device
    x_t = traj.latents[:, k].to(dev).contiguous()
    neg = traj.negative_prompt_embeds.to(dev) if traj.negative_prompt_embeds is not None else None
    eps = policy.predict_eps(x_t, traj.timesteps[k], traj.prompt_embeds.to(dev), neg, traj.guidance_scale)
    mean, std = step_mean_std(
        traj.stepper, policy.schedule, eps, x_t, traj.timesteps[k], traj.timesteps[k + 1], traj.eta
    )
    return sample_or_score(mean, std, x_next=traj.latents[:, k + 1].to(dev))


@torch.no_grad()
def evaluate_log_probs(policy: Policy, traj: Trajectory, steps: list[int] | None = None) -> Tensor:
    """log p_theta(x_{t_{k+1}} | x_{t_k}) at the given step indices (default all): (B, len(steps)) float32."""
    steps = list(range(traj.num_steps)) if steps is None else steps
    return torch.stack([transition(policy, traj, k).log_prob for k in steps], dim=1)
