"""The toy-gmm preset: a Gaussian mixture with an exact pretrained score (README.md, "The toy with a known optimum").

s_theta(t, x) = s_pre(t, x) + MLP_theta(t, x), with MLP's last layer zero-initialised, so the policy starts
as the exact pretrained model. It exposes the same interface as DiffusionPolicy (predict_eps, reference,
time_grid, ...), so rollouts, rewards and the learner run the very same code on it as on SD.
States are x: (B, d); there are no prompts (embeddings are (B, 1, 1) zeros).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from scoreaction.config import PolicyConfig, ToyConfig
from scoreaction.sde import LinearVPSchedule, alpha_bar, eps_to_score, score_to_eps, uniform_time_grid
from scoreaction.toy import GaussianMixture


def time_features(t: Tensor, n: int = 8) -> Tensor:
    """(B,) -> (B, 2n + 1): t and sin/cos at octave frequencies."""
    t = t.float()[:, None]
    freqs = 2.0 ** torch.arange(n, device=t.device, dtype=torch.float32)[None] * torch.pi / 2
    return torch.cat([t, torch.sin(freqs * t), torch.cos(freqs * t)], dim=1)


class ToyPolicy(nn.Module):
    """Exact mixture score plus a learned correction. Attributes mirror DiffusionPolicy."""

    prediction_type = "epsilon"

    def __init__(self, toy: ToyConfig, policy_cfg: PolicyConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = policy_cfg or PolicyConfig()
        self.toy = toy
        self.mixture = GaussianMixture(toy.weights, toy.means, toy.std)
        self.schedule = LinearVPSchedule(toy.beta_min, toy.beta_max)
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.base_model = "toy-gmm"
        d = self.mixture.dim
        g = torch.Generator().manual_seed(seed)
        self.correction = nn.Sequential(
            nn.Linear(d + 17, toy.hidden),
            nn.SiLU(),
            nn.Linear(toy.hidden, toy.hidden),
            nn.SiLU(),
            nn.Linear(toy.hidden, d),
        )
        with torch.no_grad():
            for m in self.correction:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
                    m.bias.zero_()
            self.correction[-1].weight.zero_()
        self._use_reference = False

    @property
    def dim(self) -> int:
        return self.mixture.dim

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.correction.parameters())

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.correction.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        self.correction.load_state_dict(state)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context the policy is the exact pretrained score s_pre."""
        prev, self._use_reference = self._use_reference, True
        try:
            yield
        finally:
            self._use_reference = prev

    def score(self, x: Tensor, t: Tensor) -> Tensor:
        """s_theta(t, x): (B, d) float32; t scalar or (B,)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        s_pre = self.mixture.score(self.schedule, t, x.detach()).float()
        if self._use_reference:
            return s_pre
        tb = t.float().expand(x.shape[0]) if t.dim() == 0 else t.float()
        return s_pre + self.correction(torch.cat([x.float(), time_features(tb)], dim=1))

    def encode_prompts(self, prompts: list[str]) -> Tensor:
        return torch.zeros(len(prompts), 1, 1)

    def predict_eps(
        self, x_t: Tensor, t: Tensor, prompt_embeds: Tensor, negative_prompt_embeds, guidance_scale: float
    ) -> Tensor:
        ab = alpha_bar(self.schedule, torch.as_tensor(t, dtype=torch.float64))
        return score_to_eps(self.score(x_t, t), ab)

    def eps_to_score(self, eps: Tensor, t: Tensor) -> Tensor:
        return eps_to_score(eps, alpha_bar(self.schedule, torch.as_tensor(t, dtype=torch.float64)))

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float()

    def latent_shape(self, height, width) -> tuple[int, ...]:
        return (self.dim,)

    def time_grid(self, num_steps: int) -> Tensor:
        return uniform_time_grid(num_steps, 1.0, self.toy.t_end)
