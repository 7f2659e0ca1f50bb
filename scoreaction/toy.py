"""A Gaussian mixture whose noised score is exact (README.md, "The toy with a known optimum").

p_pre = sum_k w_k N(mu_k, std_k^2 I) in d dims. Under the VP forward process
x_t = sqrt(ab) x_0 + sqrt(1 - ab) z, component k becomes N(sqrt(ab) mu_k, v_k(t) I) with
v_k(t) = ab std_k^2 + (1 - ab), so the score of the noised law is the responsibility-weighted sum

    s(t, x) = sum_k r_k(t, x) * (sqrt(ab) mu_k - x) / v_k(t),   r_k ∝ w_k N(x; sqrt(ab) mu_k, v_k I).

Pure tensor code; float64 inside for accuracy, float32 out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from scoreaction.sde import VPSchedule, alpha_bar


class GaussianMixture:
    """weights: (K,), means: (K, d), stds: (K,) isotropic standard deviations."""

    def __init__(self, weights, means, stds) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64).flatten()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() == 1:
            self.means = self.means[:, None]
        stds = torch.as_tensor(stds, dtype=torch.float64).flatten()
        self.stds = stds.expand(self.weights.numel()).clone() if stds.numel() == 1 else stds
        k = self.weights.numel()
        if self.means.shape[0] != k or self.stds.numel() != k:
            raise ValueError(
                f"mixture shapes disagree: {k} weights, {self.means.shape[0]} means, {self.stds.numel()} stds"
            )
        if not bool((self.weights > 0).all()) or abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ValueError(f"mixture weights must be positive and sum to 1, got {self.weights.tolist()}")
        if not bool((self.stds > 0).all()):
            raise ValueError(f"mixture stds must be > 0, got {self.stds.tolist()}")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _noised(self, schedule: VPSchedule, t: Tensor) -> tuple[Tensor, Tensor]:
        ab = alpha_bar(schedule, torch.as_tensor(t, dtype=torch.float64))
        ab = ab.reshape(-1, 1) if ab.dim() else ab
        means = ab.sqrt()[..., None] * self.means if ab.dim() else ab.sqrt() * self.means  # (B?, K, d)
        var = ab * self.stds**2 + (1 - ab)  # (B?, K)
        return means, var

    def log_responsibilities(self, schedule: VPSchedule, t: Tensor, x: Tensor) -> Tensor:
        """log r_k(t, x): (B, K). x: (B, d); t scalar or (B,)."""
        x = x.to(torch.float64)
        means, var = self._noised(schedule, t)
        diff = x[:, None, :] - means  # (B, K, d)
        logp = -0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(2 * torch.pi * var)
        logp = logp + torch.log(self.weights)
        return logp - torch.logsumexp(logp, dim=1, keepdim=True)

    def score(self, schedule: VPSchedule, t: Tensor, x: Tensor) -> Tensor:
        """Exact score of the noised mixture, (B, d) float32."""
        x64 = x.to(torch.float64)
        means, var = self._noised(schedule, t)
        r = self.log_responsibilities(schedule, t, x64).exp()  # (B, K)
        per_comp = (means - x64[:, None, :]) / var[..., None]  # (B, K, d)
        return (r[..., None] * per_comp).sum(1).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples of the clean mixture, (n, d) float32."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, self.dim), generator=generator, dtype=torch.float64)
        return (self.means[comp] + self.stds[comp, None] * z).float()

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def variance(self) -> Tensor:
        """Per-dimension variance of the mixture, (d,)."""
        m = self.mean()
        second = (self.weights[:, None] * (self.means**2 + self.stds[:, None] ** 2)).sum(0)
        return second - m**2


def tilted_optimum(mixture: GaussianMixture, a: Tensor | list[float], kl_coef: float) -> dict:
    """The optimum of E[r] - kl_coef KL(p || p_pre) for r(x) = a^T x (README.md, "The toy with a known optimum"):
    p* ∝ p_pre exp(r / kl_coef), again a Gaussian mixture with

        w_k* ∝ w_k exp(a^T mu_k / beta + std_k^2 |a|^2 / (2 beta^2)),   mu_k* = mu_k + std_k^2 a / beta,
        J* = beta log E_pre[exp(r / beta)],   KL* = E*[r] / beta - log E_pre[exp(r / beta)].
    Returns {"mixture", "weights", "means", "reward", "kl", "objective", "reward_pre"} (float64 tensors /
    floats). kl_coef must be > 0 (without the KL the optimum collapses onto argmax r)."""
    if not kl_coef > 0:
        raise ValueError(f"algorithm.kl_coef={kl_coef!r}: the tilted optimum needs kl_coef > 0")
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    beta, var = float(kl_coef), mixture.stds**2
    log_z_k = mixture.means @ a / beta + var * float(a @ a) / (2 * beta**2)  # log E_k[exp(r / beta)]
    log_z = torch.logsumexp(torch.log(mixture.weights) + log_z_k, dim=0)
    weights = torch.exp(torch.log(mixture.weights) + log_z_k - log_z)
    means = mixture.means + var[:, None] * a / beta
    reward = float(weights @ (means @ a))
    return {
        "mixture": GaussianMixture(weights, means, mixture.stds),
        "weights": weights,
        "means": means,
        "reward": reward,
        "kl": reward / beta - float(log_z),
        "objective": beta * float(log_z),
        "reward_pre": float(mixture.mean() @ a),
    }


def component_stats(x: Tensor, mixture: GaussianMixture) -> tuple[Tensor, Tensor]:
    """Assign each sample x: (n, d) to its most likely component of ``mixture`` (at t = 0) and return the
    fraction of samples per component (K,) and each component's sample mean (K, d) (NaN if empty)."""
    x64 = x.to(torch.float64)
    diff = x64[:, None, :] - mixture.means  # (n, K, d)
    var = mixture.stds**2
    logp = -0.5 * (diff**2).sum(-1) / var - 0.5 * mixture.dim * torch.log(var) + torch.log(mixture.weights)
    comp = logp.argmax(dim=1)
    k = mixture.weights.numel()
    frac = torch.bincount(comp, minlength=k).double() / x.shape[0]
    means = torch.stack(
        [
            x64[comp == j].mean(0)
            if bool((comp == j).any())
            else torch.full((mixture.dim,), float("nan"), dtype=torch.float64)
            for j in range(k)
        ]
    )
    return frac, means
