"""value.kind=imagereward: the authors' value network, a copy of ImageReward on the decoded state with its
lower layers frozen, blended with the reward of x0_hat by cos/sin. On the tiny preset with a tiny seeded
ImageReward written in the published format and loaded back through the real loader."""

from __future__ import annotations

import math

import pytest
import torch
from test_rewards_imagereward import published_state, write_published

from scoreaction import value_gradient
from scoreaction.algorithms import reward_to_go
from scoreaction.builders import build_policy, build_value_function
from scoreaction.config import ConfigError, build_config
from scoreaction.rewards.imagereward import REWARD_MEAN, REWARD_STD, load_imagereward_model
from scoreaction.trainer import Trainer
from scoreaction.value import ClippedAdamW, build_value_optimizer
from scoreaction.value_networks import ImageRewardValue, frozen_parameter_names

PROMPTS = ["a photo of a cat", "a red bicycle"]  # words of the tiny BERT vocabulary


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("ir-value"), published_state(seed=3))


def _cfg(tiny_dir, ir_dir, tmp_path, *extra: str):
    return build_config(
        "tiny",
        overrides=[
            f"model.name_or_path={tiny_dir}",
            "value.kind=imagereward",
            f"value.weights={ir_dir}",
            f"reward.imagereward.tokenizer={ir_dir / 'tokenizer'}",
            "value.frozen_fraction=0.5",
            "sampler.num_steps=2",
            "sampler.height=32",  # 4 x 4 latents: the VAE's decode is most of these tests' time
            "sampler.width=32",
            "run.num_samples=4",
            "sampler.batch_size=4",
            "algorithm.micro_batch_size=4",
            "algorithm.kl_coef=0",
            f"run.prompts=[{', '.join(PROMPTS)}]",
            f"run.output_dir={tmp_path}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def trainer(tiny_dir, ir_dir, tmp_path_factory):
    """Shared by the tests that leave it as they found it (test_update_value builds its own)."""
    torch.manual_seed(0)
    return Trainer(_cfg(tiny_dir, ir_dir, tmp_path_factory.mktemp("run")))


def _states(trainer, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = trainer.policy.latent_shape(trainer.cfg.sampler.height, trainer.cfg.sampler.width)
    x = torch.randn((n, *shape), generator=g)
    emb = trainer.policy.encode_prompts([PROMPTS[i % 2] for i in range(n)])
    return x, emb, [PROMPTS[i % 2] for i in range(n)]


def test_builds_the_imagereward_kind_with_its_output_shape(trainer, ir_dir):
    v = trainer.value_fn
    assert isinstance(v, ImageRewardValue) and not v.training
    x, emb, prompts = _states(trainer)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])
    r = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out = v(t, x, emb, r, prompts=prompts)
    assert out.shape == (4,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # the text and the state both matter
    f = v.learned(x, prompts)
    assert not torch.equal(f, v.learned(x, list(reversed(prompts))))
    assert not torch.equal(f, v.learned(x.flip(0), prompts))
    # F_phi starts as the reward model itself (same weights, same pixels)
    reward_model = load_imagereward_model(str(ir_dir))
    ids, mask = v.tokens(prompts, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(f.detach(), reward_model(v.pixels(x), ids, mask), rtol=0, atol=1e-5)
    # the value network's parameters are the ImageReward copy alone: not the policy's UNet, VAE or encoder
    assert {n.split(".")[0] for n, _ in v.named_parameters()} == {"model"}
    with pytest.raises(ValueError, match="reads each state's prompt text: got no prompts for 4 states"):
        v(t, x, emb, r)


def test_frozen_fraction_follows_imagereward_fix_rate(trainer):
    # tiny towers: 2 ViT blocks, 2 BERT layers; fix_rate 0.5 -> k = int(2 * 0.5) = 1: the embeddings, layer 0
    # and the first weight of layer 1 (the authors' loop breaks after freezing it)
    v = trainer.value_fn
    frozen = {n[len("model.") :] for n, p in v.named_parameters() if not p.requires_grad}
    names = {n for n, _ in v.model.named_parameters()}
    expected = {
        n
        for n in names
        if n.startswith(
            ("vision.embeddings.", "vision.encoder.layers.0.", "text.embeddings.", "text.encoder.layer.0.")
        )
    } | {"vision.encoder.layers.1.layer_norm1.weight", "text.encoder.layer.1.attention.self.query.weight"}
    assert frozen == expected
    assert not any(n.startswith("mlp.") or n.startswith("vision.post_layernorm") for n in frozen)
    # published depths: 24 ViT blocks, 12 BERT layers at 0.7 -> blocks 0-15 and layers 0-7 (+ one weight each)
    assert frozen_parameter_names(v.model, 0.0) == set()
    assert frozen_parameter_names(v.model, 1.0) == {
        n for n in names if n.startswith(("vision.", "text."))
    }  # int(2 * 1.0) = 2 = depth: both towers whole, as the authors' loop with no layer to stop at


def test_update_value_moves_the_trainable_part_only_and_lowers_the_loss(tiny_dir, ir_dir, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(_cfg(tiny_dir, ir_dir, tmp_path))
    v, learner = trainer.value_fn, trainer.learner
    batch = trainer.rollouts.scored(0).batch
    assert batch.r_x0 is not None  # the reward prior is on: r_x0 of every state
    before = {n: p.detach().clone() for n, p in v.named_parameters()}
    target = reward_to_go(batch.rewards.float(), batch.traj.extras["kl"].float(), 0.0)[:, :-1]

    def loss() -> float:
        return float(torch.nn.functional.mse_loss(learner.values(batch)[:, :-1], target))

    loss_before = loss()
    # one step: one pass (value.updates_per_epoch 4 in tiny -> set to 1) over one mini-batch of all 4
    learner.cfg.value.updates_per_epoch = 1
    metrics = learner.update_value(batch)
    assert metrics["value/loss"] == pytest.approx(loss_before, rel=1e-5)  # the step's own loss, before it
    assert loss() < loss_before
    for n, p in v.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == p.requires_grad, f"{n}: changed={changed}, trainable={p.requires_grad}"
    # the value-gradient estimator's grad_x V reaches the network with the states' prompts (the JPEG reward
    # is not differentiable, so all of it is sin(pi t/2) grad_x F_phi, through the VAE)
    g = value_gradient._grad_x_value(learner, batch.traj, 0)
    assert g.shape == batch.traj.latents[:, 0].shape and torch.isfinite(g).all() and g.abs().sum() > 0


def test_cos_sin_blend_at_the_ends_against_closed_forms(trainer, tmp_path):
    # last MLP layer zero with bias b: F_phi = (b - 0.16717362830052426) / 1.0333394966054072 for every state
    state = published_state(seed=4)
    state["mlp.layers.7.weight"] = torch.zeros(1, 4)
    state["mlp.layers.7.bias"] = torch.tensor([2.5])
    const = write_published(tmp_path / "ir-const", state)
    f = (2.5 - REWARD_MEAN) / REWARD_STD
    cfg = trainer.cfg.model_copy(deep=True)
    cfg.value.weights = str(const)
    v = build_value_function(cfg, trainer.policy)
    x, emb, prompts = _states(trainer)
    r = torch.tensor([0.5, -1.0, 2.0, 0.25])
    with torch.no_grad():
        # t = 0: V = R(x0_hat) exactly; t = 1: V = F_phi (+ cos(pi/2) r = 6e-17 r); t = 1/2: (r + F) / sqrt 2
        torch.testing.assert_close(v(torch.zeros(4), x, emb, r, prompts=prompts), r, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            v(torch.ones(4), x, emb, r, prompts=prompts), torch.full((4,), f), rtol=0, atol=1e-6
        )
        half = (r + f) / math.sqrt(2)
        torch.testing.assert_close(
            v(torch.full((4,), 0.5), x, emb, r, prompts=prompts), half, rtol=0, atol=1e-6
        )
        v.use_reward_prior = False  # V = F_phi at every t, r_x0 not needed
        torch.testing.assert_close(
            v(torch.zeros(4), x, emb, None, prompts=prompts), torch.full((4,), f), rtol=0, atol=1e-6
        )


def test_grad_x_flows_through_decode_and_chunks_change_nothing(trainer, monkeypatch):
    v = trainer.value_fn
    # only F_phi(decode(x)): its gradient can only come through the VAE
    monkeypatch.setattr(v, "use_reward_prior", False)
    monkeypatch.setattr(v, "chunk_size", v.chunk_size)
    x, emb, prompts = _states(trainer, n=3, seed=1)
    t = torch.full((3,), 0.5)

    def grad(chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        v.chunk_size = chunk
        xr = x.clone().requires_grad_(True)
        out = v(t, xr, emb, prompts=prompts)
        (g,) = torch.autograd.grad(out.sum(), xr)
        return out.detach(), g

    out, g = grad(64)
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and (g.flatten(1).abs().sum(1) > 0).all()
    # a central difference of F_phi along the gradient's direction agrees with grad . d
    d = g / g.norm()
    with torch.no_grad():
        eps = 1e-2
        fd = (v.learned(x + eps * d, prompts).sum() - v.learned(x - eps * d, prompts).sum()) / (2 * eps)
    assert float(fd) == pytest.approx(float((g * d).sum()), rel=0.05)
    # chunks of 2 (activation checkpointing: the backward recomputes each chunk) give the same value and grad_x
    out2, g2 = grad(2)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5)
    torch.testing.assert_close(g2, g, rtol=1e-4, atol=1e-6)


def test_optimiser_settings(trainer):
    v = trainer.value_fn
    opt = trainer.learner.value_optimizer
    assert type(opt) is torch.optim.Adam  # tiny: weight_decay 0, no clipping -> plain Adam, as before
    trainable = [p for p in v.parameters() if p.requires_grad]
    assert [id(p) for p in opt.param_groups[0]["params"]] == [
        id(p) for p in trainable
    ]  # frozen ones left out
    cfg = build_config(
        "tiny", overrides=["value.weight_decay=0.01", "value.max_grad_norm=1.0", "value.learning_rate=1e-7"]
    )
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    net[0].requires_grad_(False)
    opt = build_value_optimizer(net, cfg.value)
    assert isinstance(opt, ClippedAdamW) and opt.max_grad_norm == 1.0
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (1e-7, 0.01)
    assert len(opt.param_groups[0]["params"]) == 2  # net[1]'s weight and bias
    for p in net[1].parameters():
        p.grad = torch.full_like(p, 1e3)
    opt.step()
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in net[1].parameters()]))
    assert float(norm) == pytest.approx(1.0, rel=1e-4)  # the step clipped the gradient to max_grad_norm


def test_paper_preset_uses_the_authors_value_network():
    cfg = build_config("sd15-ctrl-paper")
    v = cfg.value
    # github.com/hanyang1999/ContTimeRL4DM ddpo_continuous/, V = d1d7c02 config/dgx_with_value_func.py
    # imagereward() (pretrain_VN.*, v_step, design), B = 82b2ca6 scripts/src/ImageReward_VN_train.py (fix_rate)
    assert (v.kind, v.use_reward_prior, v.frozen_fraction) == ("imagereward", True, 0.7)
    assert (v.learning_rate, v.weight_decay, v.max_grad_norm, v.updates_per_epoch) == (1e-7, 0.01, 1.0, 1)
    assert v.pretrain_epochs == 61  # value_network_epoch_60.pt: saved after epoch index 60
    assert build_config("sd15").value.kind == "conv" and build_config("tiny").value.kind == "conv"


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("value.kind=blip", r"value.kind='blip': Input should be 'conv' or 'imagereward'"),
        ("value.frozen_fraction=1.5", r"value.frozen_fraction=1.5: Input should be less than or equal to 1"),
        (
            "value.frozen_fraction=-0.1",
            r"value.frozen_fraction=-0.1: Input should be greater than or equal to 0",
        ),
        ("value.max_grad_norm=0", r"value.max_grad_norm=0: Input should be greater than 0"),
        ("value.weight_decay=-1", r"value.weight_decay=-1: Input should be greater than or equal to 0"),
        ("value.chunk_size=0", r"value.chunk_size=0: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config("tiny", overrides=[item])


def test_build_errors_name_the_field(tiny_dir, tmp_path):
    cfg = build_config("toy-gmm", overrides=["value.kind=imagereward"])
    with pytest.raises(
        ValueError,
        match=r"value.kind='imagereward' needs an image model.*model.preset='toy-gmm'.*value.kind='conv'",
    ):
        build_value_function(cfg, build_policy(cfg))
    cfg = build_config("tiny", overrides=[f"model.name_or_path={tiny_dir}", "value.kind=imagereward"])
    with pytest.raises(ValueError, match=r"set value.weights or reward.imagereward.weights"):
        build_value_function(cfg, build_policy(cfg))
    cfg = build_config(
        "tiny",
        overrides=[f"model.name_or_path={tiny_dir}", "value.kind=imagereward", f"value.weights={tmp_path}"],
    )
    with pytest.raises(Exception, match=r"value.weights"):
        build_value_function(cfg, build_policy(cfg))
