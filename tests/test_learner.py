"""The learner step: which parameters move, resume state, and the value-gradient estimator against a
finite difference of J on the toy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import randomize_lora
from torch import nn

from scoreaction.config import build_config
from scoreaction.learner import Learner, lr_factor
from scoreaction.models.toy_gmm import ToyPolicy
from scoreaction.sampling import sample_trajectories
from scoreaction.sde import alpha_bar
from scoreaction.trainer import Trainer


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize(
    "overrides",
    [
        ["algorithm.name=ctrl", "algorithm.estimator=ratio"],
        ["algorithm.name=ctrl", "algorithm.estimator=value_gradient"],
        ["algorithm.name=ddpo"],
    ],
    ids=["ctrl-ratio", "ctrl-value-gradient", "ddpo"],
)
def test_one_update_moves_every_trainable_parameter_and_no_frozen_one(tiny_dir, tmp_path, overrides):
    cfg = build_config(
        "tiny",
        overrides=[
            *overrides,
            f"model.name_or_path={tiny_dir}",
            "sampler.num_steps=2",
            "run.num_samples=4",
            "algorithm.micro_batch_size=4",
            "algorithm.kl_coef=0.1",
            "algorithm.stat_min_count=1",
            "run.prompts=[a photo of a cat]",  # DDPO's per-prompt stats need repeats of a prompt
            f"run.output_dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg)
    # LoRA's B starts at zero, which makes A's first gradient exactly zero: start from a random adapter.
    randomize_lora(trainer.policy, scale=0.05)
    unet_before, value_before = _snapshot(trainer.policy.unet), _snapshot(trainer.value_fn)
    scored = trainer.rollouts.scored(0)
    batch = scored.batch
    # only ctrl's value function uses R(x0_hat_k); ddpo's rollouts score the final images alone
    assert (batch.r_x0 is None) == (cfg.algorithm.name == "ddpo")
    assert scored.queries == 4 * (1 if batch.r_x0 is None else 1 + cfg.sampler.num_steps)
    if cfg.algorithm.name == "ctrl":
        trainer.learner.update_value(batch)
    trainer.learner.update_policy(batch)
    trainable = {n for n, p in trainer.policy.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in n for n in trainable)
    for name, p in trainer.policy.unet.named_parameters():
        changed = not torch.equal(p.detach(), unet_before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"
    for name, p in trainer.value_fn.named_parameters():
        changed = not torch.equal(p.detach(), value_before[name])
        assert changed == (cfg.algorithm.name == "ctrl"), f"value {name}: changed={changed}"


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
        # cos(pi e / 4) from 1 to -1 mapped onto [0.1, 1]: 0.1 + 0.9 (1 + cos) / 2
        ("cosine", [1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1 + 0.45 * (1 - math.sqrt(0.5)), 0.1]),
        ("linear", [1.0, 0.775, 0.55, 0.325, 0.1]),
    ],
)
def test_learning_rate_schedule_over_the_run(schedule, expected):
    assert [lr_factor(schedule, e, 5, 0.1) for e in range(5)] == pytest.approx(expected)
    assert lr_factor(schedule, 9, 5, 0.1) == pytest.approx(expected[-1])  # held after the last epoch


def test_learner_steps_its_learning_rate_once_per_policy_update(tmp_path):
    cfg = build_config(
        "toy-gmm",
        overrides=[
            "run.num_samples=16",
            "algorithm.micro_batch_size=16",
            "sampler.num_steps=2",
            "run.epochs=3",
            "algorithm.learning_rate=1e-3",
            "algorithm.lr_schedule=linear",
            "algorithm.lr_final_ratio=0.5",
        ],
    )
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    lrs = [trainer.learner.update_policy(batch)["learner/lr"] for _ in range(3)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4])


def test_learner_state_round_trips(tmp_path):
    cfg = build_config(
        "toy-gmm",
        overrides=[
            "run.num_samples=64",
            "algorithm.micro_batch_size=32",
            "sampler.num_steps=4",
            "algorithm.lr_schedule=cosine",
            "run.epochs=4",
        ],
    )
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    trainer.learner.update_value(batch)
    trainer.learner.update_policy(batch)
    state = copy.deepcopy(trainer.learner.state_dict())  # like torch's: references, not copies

    other = Trainer(cfg, tmp_path / "other")
    other.policy.load_trainable_state_dict(trainer.policy.trainable_state_dict())
    other.learner.load_state_dict(state)
    # Same state -> the very same next update.
    assert other.learner.scheduler.last_epoch == 1
    trainer.learner.update_policy(batch)
    other.learner.update_policy(batch)
    for (n, a), b in zip(
        trainer.policy.trainable_state_dict().items(),
        other.policy.trainable_state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), n


class TweedieValue(nn.Module):
    """The exact value of the pretrained toy policy for r(x) = a x (no KL to go at theta = theta_0):
    V(t, x) = E[X_0 | X_t = x] a = a (x + (1 - ab_t) s_pre(t, x)) / sqrt(ab_t)   (Tweedie's formula)."""

    use_reward_prior = False

    def __init__(self, policy: ToyPolicy, a: float) -> None:
        super().__init__()
        self.policy, self.a = policy, a
        self.dummy = nn.Parameter(torch.zeros(1))  # the learner builds an optimiser over it

    def forward(self, t, x, prompt_embeds, r_x0=None, prompts=None):
        t0 = t.reshape(-1)[0].double()
        ab = float(alpha_bar(self.policy.schedule, t0))
        s_pre = self.policy.mixture.score(self.policy.schedule, t0, x)
        return (self.a * (x + (1 - ab) * s_pre) / math.sqrt(ab)).sum(1)


def test_value_gradient_estimator_matches_a_finite_difference_of_j():
    """At theta_0 (policy = pretrained) move the last layer of MLP_theta along a random direction v:
    dJ/d(delta) by central differences of a common-random-number Monte Carlo J, against the estimator
    E sum_k h_k g^2 (d s / d delta) . grad_x V with the exact V (the KL term vanishes at theta_0)."""
    steps, n, delta = 100, 4000, 0.05
    cfg = build_config(
        "toy-gmm",
        overrides=[
            f"sampler.num_steps={steps}",
            "algorithm.estimator=value_gradient",
            "algorithm.kl_coef=2.0",
            f"sampler.batch_size={n}",
        ],
    )
    policy = ToyPolicy(cfg.model.toy, cfg.policy, seed=0)
    last = policy.correction[-1]
    g = torch.Generator().manual_seed(7)
    v = {
        "weight": torch.randn(last.weight.shape, generator=g) * 0.3,
        "bias": torch.randn(last.bias.shape, generator=g),
    }

    def objective(shift: float) -> float:
        with torch.no_grad():
            last.weight.copy_(shift * v["weight"])
            last.bias.copy_(shift * v["bias"])
        traj = sample_trajectories(
            policy, [""] * n, cfg.sampler, torch.Generator().manual_seed(0), record_reference=True
        )
        return float(traj.latents[:, -1, 0].mean() - cfg.algorithm.kl_coef * traj.extras["kl"].sum(1).mean())

    fd = (objective(delta) - objective(-delta)) / (2 * delta)

    objective(0.0)  # back to theta_0
    traj = sample_trajectories(
        policy, [""] * n, cfg.sampler, torch.Generator().manual_seed(1), record_reference=True
    )
    learner = Learner(policy, TweedieValue(policy, 1.0), cfg)
    policy.correction.zero_grad()
    for k in range(steps):
        learner.value_gradient_surrogate(traj, torch.arange(n), k, steps).backward()
    estimate = -(float((last.weight.grad * v["weight"]).sum()) + float((last.bias.grad * v["bias"]).sum()))
    print(f"\ndJ/d(delta): finite difference {fd:.4f}, value-gradient estimator {estimate:.4f}")
    assert estimate == pytest.approx(fd, rel=0.03)


@pytest.mark.parametrize("algorithm", ["ctrl", "ddpo"])
def test_rollout_and_micro_batches_that_do_not_divide_the_epoch_run(tmp_path, algorithm):
    """10 samples in rollout batches of 4 and micro-batches of 3: the last of each is smaller, and the epoch
    runs (the config accepts it; only the learner split must divide, see tests/test_config.py)."""
    cfg = build_config(
        "toy-gmm",
        overrides=[
            f"algorithm.name={algorithm}",
            "run.num_samples=10",
            "sampler.batch_size=4",
            "algorithm.micro_batch_size=3",
            "sampler.num_steps=3",
            "value.updates_per_epoch=1",
            f"run.output_dir={tmp_path}",
        ],
    )
    trainer = Trainer(cfg, tmp_path)
    before = _snapshot(trainer.policy)
    metrics = trainer.epoch(0)
    assert metrics["samples"] == 10 and metrics["learner/skipped_steps"] == 0
    assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.policy.named_parameters())
