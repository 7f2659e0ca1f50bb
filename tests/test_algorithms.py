"""CTRL / DDPO math against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scoreaction.algorithms import (
    PerPromptStatTracker,
    clipped_surrogate,
    lambda_advantages,
    normalize_per_step,
    reward_to_go,
    td_advantages,
)


def test_clipped_loss_hand_computed():
    # A = (1, -1), log rho = (log 1.5, log 0.5), eps = 0.2
    # sample 1: max(-1 * 1.5, -1 * 1.2) = -1.2 ; sample 2: max(1 * 0.5, 1 * 0.8) = 0.8 ; mean = -0.2
    adv = torch.tensor([1.0, -1.0])
    log_ratio = torch.log(torch.tensor([1.5, 0.5]))
    loss, clipfrac, approx_kl = clipped_surrogate(adv, log_ratio, 0.2)
    assert float(loss) == pytest.approx(-0.2)
    assert float(clipfrac) == 1.0
    # k3: mean((rho - 1) - log rho) = ((0.5 - 0.405465) + (-0.5 + 0.693147)) / 2 = 0.143841
    assert float(approx_kl) == pytest.approx(0.143841, rel=1e-5)


def test_advantages_telescope():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=g)
    reward = torch.randn(5, generator=g)
    values[:, -1] = reward
    kl = torch.rand(5, 6, generator=g)
    adv = td_advantages(values, kl, kl_coef=0.3)
    # sum_k A_k = r - V(t_0, x_{t_0}) - kl_coef * sum_k KL_k
    torch.testing.assert_close(adv.sum(1), reward - values[:, 0] - 0.3 * kl.sum(1))


def test_lambda_advantages_hand_computed():
    # V = (0, 0.5, 1.0), r = 2, KL = (0.1, 0.2, 0.3), kl_coef = 1: delta = (0.4, 0.3, 0.7)
    values, kl = torch.tensor([[0.0, 0.5, 1.0, 2.0]]), torch.tensor([[0.1, 0.2, 0.3]])
    torch.testing.assert_close(lambda_advantages(values, kl, 1.0, 0.0), torch.tensor([[0.4, 0.3, 0.7]]))
    # lam = 0.5: A_2 = 0.7, A_1 = 0.3 + 0.5 * 0.7 = 0.65, A_0 = 0.4 + 0.5 * 0.65 = 0.725
    torch.testing.assert_close(lambda_advantages(values, kl, 1.0, 0.5), torch.tensor([[0.725, 0.65, 0.7]]))
    # lam = 1: the Monte-Carlo return less the value, r - sum_{j>=k} KL_j - V_k = (1.4, 1.0, 0.7)
    torch.testing.assert_close(lambda_advantages(values, kl, 1.0, 1.0), torch.tensor([[1.4, 1.0, 0.7]]))


def test_reward_to_go_hand_computed():
    # r = 1, KL = (0.1, 0.2, 0.3), kl_coef = 2: G = (1 - 1.2, 1 - 1.0, 1 - 0.6, 1) = (-0.2, 0, 0.4, 1)
    g = reward_to_go(torch.tensor([1.0]), torch.tensor([[0.1, 0.2, 0.3]]), 2.0)
    torch.testing.assert_close(g, torch.tensor([[-0.2, 0.0, 0.4, 1.0]]))


def test_normalize_per_step_and_clip():
    adv = torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 30.0]])
    out, std = normalize_per_step(adv, clip=1.0)
    # column 0: mean 3, std 2 -> (-1, 0, 1); column 1: mean 10, std 17.32 -> clipped to +-1 at most
    torch.testing.assert_close(out[:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert float(std[0]) == pytest.approx(2.0)
    assert float(std[1]) == pytest.approx(math.sqrt(300.0))
    assert float(out.abs().max()) <= 1.0


def test_stat_tracker_global_then_per_prompt():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    # first call: "a" has one reward (< min_count) -> global stats of the batch (mean 2, std 0.8165)
    adv = tracker.update(["a", "b", "b"], np.array([1.0, 2.0, 3.0]))
    assert adv[0] == pytest.approx((1 - 2) / (np.std([1, 2, 3]) + 1e-6))
    # "b" has 2 rewards -> its own stats (mean 2.5, std 0.5)
    assert adv[1] == pytest.approx((2 - 2.5) / (0.5 + 1e-6))
    # second call: "a" now has buffer [1, 5] -> mean 3, std 2
    adv = tracker.update(["a"], np.array([5.0]))
    assert adv[0] == pytest.approx((5 - 3) / (2 + 1e-6))
    state = tracker.state_dict()
    other = PerPromptStatTracker()
    other.load_state_dict(state)
    assert other.stats["b"] == tracker.stats["b"]
