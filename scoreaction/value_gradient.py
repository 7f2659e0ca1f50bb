"""The continuous-time value-gradient estimator of CTRL (README.md, "The method in code").

Step k's share of the policy gradient is (d s_theta / d theta)^T [c1 grad_x V(t_k, x_k) - kl_coef c2
(s_theta - s_ref)]: it needs the gradient of the value in x, through the reward prior R(decode(x0_hat)) when
the value function uses it, and no log-probabilities. The Learner optimises ``surrogate`` like any other loss.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from scoreaction.nonfinite import reward_label
from scoreaction.sampling import Trajectory
from scoreaction.sde import alpha_bar, eps_to_score, x0_hat

if TYPE_CHECKING:
    from scoreaction.learner import Learner

logger = logging.getLogger(__name__)


def _score(learner: Learner, x: Tensor, t: Tensor, traj: Trajectory) -> Tensor:
    """The action: the guided score s_theta(t, x), float32."""
    dev = learner.policy.device
    neg = traj.negative_prompt_embeds.to(dev) if traj.negative_prompt_embeds is not None else None
    eps = learner.policy.predict_eps(x, t, traj.prompt_embeds.to(dev), neg, traj.guidance_scale)
    return eps_to_score(eps, alpha_bar(learner.policy.schedule, torch.as_tensor(t)).to(dev))


def surrogate(learner: Learner, sub: Trajectory, k: int, num_trained: int) -> Tensor:
    """A scalar whose gradient in theta is minus step k's share of

        grad J = E sum_k h_k (d s_theta / d theta)^T [c1 grad_x V(t_k, x_k) - kl_coef c2 (s_theta - s_ref)],
        c1 = (1 + eta^2)/2 g^2,  c2 = (1 + eta^2)^2 / (4 eta^2) g^2   (both g^2 for eta = 1),
    scaled by N / num_trained when only num_trained of the N steps are trained. Needs no log-probs.
    Deterministic rollouts (eta = 0, heun) only supply states; the policy being optimised is still the
    reverse SDE (eta = 1), whose KL is the regulariser."""
    eta = sub.eta if sub.eta > 0 else 1.0
    t, s = sub.timesteps[k], sub.timesteps[k + 1]
    g2 = float(learner.policy.schedule.beta(torch.as_tensor(t)))
    c1 = 0.5 * (1 + eta**2) * g2
    c2 = (1 + eta**2) ** 2 / (4 * eta**2) * g2
    grad_v = _grad_x_value(learner, sub, k)
    x = sub.latents[:, k].to(learner.policy.device)
    s_theta = _score(learner, x, t, sub)
    with torch.no_grad(), learner.policy.reference():
        s_ref = _score(learner, x, t, sub)
    direction = c1 * grad_v - learner.cfg.algorithm.kl_coef * c2 * (s_theta.detach() - s_ref)
    weight = float(t - s) * sub.num_steps / num_trained
    return -(weight * (s_theta * direction).flatten(1).sum(1)).mean()


def _grad_x_value(learner: Learner, sub: Trajectory, k: int) -> Tensor:
    """grad_x V(t_k, x) at the stored states (B, ...), float32, detached."""
    dev = learner.policy.device
    x = sub.latents[:, k].to(dev).clone().requires_grad_(True)
    t = sub.timesteps[k]
    tb = torch.full((x.shape[0],), float(t), device=dev)
    emb = sub.prompt_embeds.to(dev)
    r_x0 = None
    if learner.value_fn.use_reward_prior:
        ab = alpha_bar(learner.policy.schedule, torch.as_tensor(t)).double()
        eps = learner.policy.predict_eps(x, t, emb, sub.negative_prompt_embeds, sub.guidance_scale)
        # decode and the reward stay in the graph: grad_x V includes cos(pi t/2) grad_x R(decode(x0_hat))
        r_x0 = learner.reward_fn(learner.policy.decode(x0_hat(x, eps, ab)), sub.prompts)
        learner.reward_queries += len(sub.prompts)
        if not r_x0.requires_grad and not learner._warned_nondifferentiable:
            learner._warned_nondifferentiable = True
            logger.warning(
                "%s is not differentiable (a JPEG size, or scores from a service): the value gradient's "
                "grad_x V(t, x) = cos(pi t/2) grad_x R(x0_hat) + sin(pi t/2) grad_x F_phi keeps only its "
                "F_phi term; use a model reward (aesthetic, clip_score, pickscore, hpsv2, imagereward) "
                "in this process for the reward term, or value.use_reward_prior=false",
                reward_label(learner.cfg),
            )
        # counted, not used: _optimise stops the run (on every rank) once the micro-batch's passes are done
        bad = ~torch.isfinite(r_x0.detach().float().cpu().reshape(len(sub.prompts), -1)).all(1)
        seen = learner._prior_nonfinite
        learner._prior_nonfinite = seen | bad if seen.shape == bad.shape else bad
    v = learner.value_fn(tb, x, emb, r_x0, prompts=sub.prompts)
    (grad,) = torch.autograd.grad(v.sum(), x)
    return grad.detach().float()
