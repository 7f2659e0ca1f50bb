"""Optimizer steps as in ddpo-pytorch (algorithm.trajectories_per_step): the gradient of one step is
accumulated over micro-batches (and their timesteps, and the data-parallel ranks) and averaged, so that
updates_per_epoch * run.num_samples / trajectories_per_step steps are taken per epoch and an accumulated
step equals one big-batch step."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch

from scoreaction.config import Config, ConfigError, build_config
from scoreaction.learner import Learner
from scoreaction.trainer import Trainer

TOY = ["sampler.num_steps=3", "value.updates_per_epoch=1", "algorithm.max_grad_norm=1e9"]
ALGORITHMS = {
    "ctrl-ratio": ["algorithm.name=ctrl", "algorithm.estimator=ratio"],
    "ctrl-value-gradient": ["algorithm.name=ctrl", "algorithm.estimator=value_gradient"],
    "ddpo": ["algorithm.name=ddpo"],
}


def _toy(tmp_path, *overrides: str) -> Config:
    return build_config("toy-gmm", overrides=[*TOY, *overrides, f"run.output_dir={tmp_path}"])


# (samples, micro-batch, trajectories per step, ranks, passes) -> optimizer steps per epoch
COUNTS = [
    (64, 16, None, 1, 1, 4),  # default: one step per micro-batch
    (64, 16, 64, 1, 1, 1),  # the whole epoch in one step
    (64, 16, 32, 1, 2, 4),  # 2 passes x 2 steps
    (64, 8, 32, 2, 1, 2),  # 2 ranks: 4 trajectories each per backward, 4 micro-batches per step
    (512, 2, 256, 1, 1, 2),  # the authors' ImageReward CTRL run: 512 samples, 2 steps
    (512, 2, None, 1, 2, 512),  # the sd15 preset: one step per micro-batch, 2 passes
    (256, 16, 128, 4, 1, 2),  # the authors' DDPO run on 4 GPUs (4 x 4 per backward, 8 accumulated)
    (10, 3, None, 1, 1, 4),  # a last micro-batch that is smaller, as before
]


@pytest.mark.parametrize(("samples", "mb", "tps", "ranks", "passes", "expected"), COUNTS)
def test_optimizer_steps_per_epoch(tmp_path, samples, mb, tps, ranks, passes, expected):
    cfg = _toy(
        tmp_path,
        f"run.num_samples={samples}",
        f"algorithm.micro_batch_size={mb}",
        f"algorithm.trajectories_per_step={'null' if tps is None else tps}",
        f"resources.num_learner_workers={ranks}",
        f"algorithm.updates_per_epoch={passes}",
    )
    assert cfg.optimizer_steps_per_epoch == expected


@pytest.mark.parametrize(
    ("samples", "mb", "tps", "passes", "expected"),
    [(32, 8, None, 1, 4), (32, 8, 16, 1, 2), (32, 8, 32, 2, 2), (32, 4, 8, 1, 4)],
)
def test_the_learner_takes_and_logs_that_many_steps(tmp_path, samples, mb, tps, passes, expected):
    cfg = _toy(
        tmp_path,
        "algorithm.name=ddpo",
        f"run.num_samples={samples}",
        f"sampler.batch_size={samples}",
        f"algorithm.micro_batch_size={mb}",
        f"algorithm.trajectories_per_step={'null' if tps is None else tps}",
        f"algorithm.updates_per_epoch={passes}",
    )
    trainer = Trainer(cfg, tmp_path)
    metrics = trainer.epoch(0)
    assert metrics["learner/optimizer_steps"] == expected == cfg.optimizer_steps_per_epoch
    assert {int(s["step"]) for s in trainer.learner.optimizer.state.values()} == {expected}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["algorithm.micro_batch_size=16", "algorithm.trajectories_per_step=24"], "multiple of"),
        (
            ["algorithm.micro_batch_size=8", "algorithm.trajectories_per_step=48"],
            "must divide run.num_samples",
        ),
        (["algorithm.micro_batch_size=8", "algorithm.trajectories_per_step=0"], "greater than or equal"),
    ],
)
def test_invalid_trajectories_per_step_is_a_config_error_naming_the_field(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        _toy(tmp_path, "run.num_samples=64", *overrides)
    assert "algorithm.trajectories_per_step" in str(info.value)


def _step_gradients(learner: Learner) -> list[dict[str, torch.Tensor]]:
    """Record the gradients each optimizer step of `learner` applies."""
    grads: list[dict[str, torch.Tensor]] = []
    names = {id(p): n for n, p in learner.policy.named_parameters()}

    def record(optimizer, args, kwargs):
        grads.append(
            {names[id(p)]: p.grad.detach().clone() for g in optimizer.param_groups for p in g["params"]}
        )

    learner.optimizer.register_step_pre_hook(record)
    return grads


def _one_epoch_update(cfg: Config, tmp_path) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    grads = _step_gradients(trainer.learner)
    trainer.learner.update_policy(batch, epoch=0)
    return grads, {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_an_accumulated_step_equals_one_big_batch_step(tmp_path, algorithm):
    """4 micro-batches of 16 accumulated into one step of 64 take the same step as one micro-batch of 64
    (the same shuffle, every timestep trained, no clipping)."""
    common = [*ALGORITHMS[algorithm], "run.num_samples=64", "sampler.batch_size=64"]
    big = _toy(tmp_path / "big", *common, "algorithm.micro_batch_size=64")
    acc = _toy(
        tmp_path / "acc", *common, "algorithm.micro_batch_size=16", "algorithm.trajectories_per_step=64"
    )
    one = _toy(tmp_path / "one", *common, "algorithm.micro_batch_size=16")
    (g_big,), w_big = _one_epoch_update(big, tmp_path / "big")
    (g_acc,), w_acc = _one_epoch_update(acc, tmp_path / "acc")
    g_one, _ = _one_epoch_update(one, tmp_path / "one")
    assert len(g_one) == 4  # the default: a step per micro-batch
    assert any(g.abs().max() > 0 for g in g_big.values())
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(w_acc[name], w_big[name], rtol=1e-5, atol=1e-7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, cfg_dict: dict) -> None:
    """One learner rank set up as scoreaction.distributed.learner_group does it (micro-batch / world per
    rank, gradients averaged over ranks after every backward pass); records the gradients of its steps."""
    import torch.distributed as dist

    from scoreaction.ddp import GradientAllReduce

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    result: dict = {}
    try:
        cfg = Config.model_validate(cfg_dict)
        trainer = Trainer(cfg, out_dir)
        learner = Learner(trainer.policy, trainer.value_fn, cfg, trainer.reward_fn, rank=rank, world=world)
        sync = GradientAllReduce(trainer.policy.trainable_parameters())
        batch = trainer.rollout(0)
        grads = _step_gradients(learner)
        metrics = learner.update_policy(batch, epoch=0)
        result = {"grads": grads, "steps": metrics["learner/optimizer_steps"]}
        sync.remove()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~20 s on an idle 2-core machine, minutes on a loaded one
def test_two_gloo_ranks_accumulate_the_same_step_as_one_process(tmp_path):
    """2 ranks, micro-batches of 8 (4 per rank), 64 trajectories per step: each rank accumulates 8
    micro-batches of its 32 rows, the ranks average, and the one step of the epoch is that of one process
    taking the 64 trajectories in one micro-batch."""
    import torch.multiprocessing as mp

    common = ["algorithm.name=ddpo", "run.num_samples=64", "sampler.batch_size=64"]
    two = _toy(
        tmp_path,
        *common,
        "algorithm.micro_batch_size=8",
        "algorithm.trajectories_per_step=64",
        "resources.num_learner_workers=2",
    )
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), two.model_dump()), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = _toy(tmp_path / "one", *common, "algorithm.micro_batch_size=64")
    expected, _ = _one_epoch_update(one, tmp_path / "one")
    assert [r["steps"] for r in ranks] == [1.0, 1.0] and len(expected) == 1
    for r in ranks:
        for got, want in zip(r["grads"], expected, strict=True):
            for name in want:
                torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)


def test_weight_decay_reaches_the_policy_optimizer(tmp_path):
    """algorithm.weight_decay (the authors' 1e-4) is AdamW's; the default 0 keeps the earlier behaviour."""
    assert Trainer(_toy(tmp_path)).learner.optimizer.param_groups[0]["weight_decay"] == 0.0
    cfg = _toy(tmp_path, "algorithm.weight_decay=1e-4")
    assert Trainer(cfg).learner.optimizer.param_groups[0]["weight_decay"] == 1e-4
