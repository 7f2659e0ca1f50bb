"""The value function with the diffusion's structure (README.md, "The method in code"):

    V(t, x, c) = cos(pi t / 2) * R(x0_hat(t, x), c) + sin(pi t / 2) * F_phi(t, x, c)

R is the (frozen) reward of the Tweedie estimate x0_hat, supplied by the caller as ``r_x0``; F_phi is
chosen by ``value.kind``: here the small learned conv head on the state, time features and the mean-pooled
prompt embedding (``conv``), or a copy of the ImageReward model on the decoded state
(``imagereward``, ``scoreaction.value_networks``). With ``use_reward_prior = False`` V = F_phi alone. At the
final state the caller uses the exact reward.

Every value function is called as ``value_fn(t, x, prompt_embeds, r_x0, prompts=prompts)``: prompts are
the texts of the rows (``Trajectory.prompts``, repeated per state), for networks that read the text
itself; the conv head ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scoreaction.config import ValueConfig
from scoreaction.models.toy_gmm import time_features


class ValueFunction(nn.Module):
    """state_shape: (d,) for toy states or (C, h, w) for latents; embed_dim: prompt embedding width."""

    def __init__(
        self, state_shape: tuple[int, ...], embed_dim: int, hidden: int = 64, use_reward_prior: bool = True
    ):
        super().__init__()
        self.use_reward_prior = use_reward_prior
        self.state_shape = tuple(state_shape)
        if len(self.state_shape) == 1:
            self.encoder = nn.Identity()
            feat = self.state_shape[0]
        else:
            c = self.state_shape[0]
            self.encoder = nn.Sequential(
                nn.Conv2d(c, 32, 3, stride=2, padding=1),
                nn.SiLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            feat = 64
        self.head = nn.Sequential(
            nn.Linear(feat + 17 + embed_dim, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def learned(self, t: Tensor, x: Tensor, prompt_embeds: Tensor) -> Tensor:
        """F_phi(t, x, c): (B,). t: (B,), x: (B, *state_shape), prompt_embeds: (B, L, D)."""
        pooled = prompt_embeds.float().mean(dim=1)
        h = torch.cat([self.encoder(x.float()), time_features(t.float()), pooled], dim=1)
        return self.head(h).squeeze(1)

    def forward(
        self,
        t: Tensor,
        x: Tensor,
        prompt_embeds: Tensor,
        r_x0: Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> Tensor:
        """V(t, x, c): (B,). r_x0: (B,) reward of x0_hat, required when use_reward_prior; prompts: unused."""
        f = self.learned(t, x, prompt_embeds)
        return blend(t, f, r_x0) if self.use_reward_prior else f


def blend(t: Tensor, f: Tensor, r_x0: Tensor | None) -> Tensor:
    """cos(pi t/2) r_x0 + sin(pi t/2) f: (B,). t, f, r_x0: (B,)."""
    if r_x0 is None:
        raise ValueError("value.use_reward_prior=True needs r_x0, the reward of x0_hat")
    tt = t.float() * (math.pi / 2)
    return torch.cos(tt) * r_x0.float() + torch.sin(tt) * f


class ClippedAdamW(torch.optim.AdamW):
    """AdamW whose step first clips the gradient norm of its parameters to max_grad_norm (None: no clip)."""

    def __init__(self, params, max_grad_norm: float | None = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm is not None:
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


def build_value_optimizer(value_fn: nn.Module, vcfg: ValueConfig) -> torch.optim.Optimizer:
    """F_phi's optimiser over its trainable parameters: Adam(value.learning_rate) when value.weight_decay is 0
    and value.max_grad_norm None, else AdamW(learning_rate, weight_decay) clipping each step's gradient norm
    to max_grad_norm (betas 0.9, 0.999 and eps 1e-8: torch's defaults, and the authors' values)."""
    params = [p for p in value_fn.parameters() if p.requires_grad]
    if vcfg.weight_decay == 0 and vcfg.max_grad_norm is None:
        return torch.optim.Adam(params, lr=vcfg.learning_rate)
    return ClippedAdamW(params, vcfg.max_grad_norm, lr=vcfg.learning_rate, weight_decay=vcfg.weight_decay)


def explained_variance(pred: Tensor, target: Tensor) -> float:
    """1 - Var[target - pred] / Var[target] (cleanrl's definition); nan when the target is constant."""
    var = float(target.var())
    return float("nan") if var == 0 else 1.0 - float((target - pred).var()) / var
