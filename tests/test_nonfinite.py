"""Non-finite numbers never reach the weights: a NaN/inf reward stops the run (NonFiniteError naming the
reward, the epoch and the count) in the single-process Trainer and in the data-parallel learner path the Ray
loop runs; a non-finite loss or gradient skips exactly that optimiser step (weights and optimiser state
bit-identical), is counted, and more than algorithm.max_skipped_steps of them stop the run; the config
rejects inf/nan in every float field."""

from __future__ import annotations

import datetime
import math
import os
import socket
import typing

import pytest
import torch
from pydantic import BaseModel

import scoreaction.learner as learner_module
from scoreaction.config import Config, ConfigError, build_config
from scoreaction.learner import Learner, NonFiniteError
from scoreaction.trainer import Trainer

# the toy preset, shrunk: one rollout batch and one micro-batch of 64, 4 steps
TOY = [
    "run.num_samples=64",
    "sampler.num_steps=4",
    "sampler.batch_size=64",
    "algorithm.micro_batch_size=64",
    "value.updates_per_epoch=1",
    "run.epochs=3",
]
ALGORITHMS = {
    "ctrl-ratio": ["algorithm.name=ctrl", "algorithm.estimator=ratio"],
    "ctrl-value-gradient": ["algorithm.name=ctrl", "algorithm.estimator=value_gradient"],
    "ddpo": ["algorithm.name=ddpo"],
}


def _toy(tmp_path, *overrides: str) -> Config:
    return build_config("toy-gmm", overrides=[*TOY, *overrides, f"run.output_dir={tmp_path}"])


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _poison_reward(trainer: Trainer, epoch: int, rows: list[int], value: float = float("nan")) -> None:
    """Make the reward that scores the rollouts return `value` for these rows of `epoch`'s rollout batch."""
    state = {"epoch": None}
    rollouts = trainer.rollouts
    scored, reward = rollouts.scored, rollouts.scorer.reward_fn

    def tracked(e, *args, **kwargs):
        state["epoch"] = e
        return scored(e, *args, **kwargs)

    def poisoned(images, prompts):
        r = reward(images, prompts).clone()
        if state["epoch"] == epoch:
            r[rows] = value
        return r

    rollouts.scored, rollouts.scorer.reward_fn = tracked, poisoned


# --------------------------------------------------------------------------------------------------
# A non-finite reward stops the run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=list(ALGORITHMS))
def test_nan_reward_at_one_epoch_stops_the_single_process_run_before_any_update(tmp_path, algorithm):
    cfg = _toy(tmp_path, *ALGORITHMS[algorithm])
    trainer = Trainer(cfg, tmp_path)
    _poison_reward(trainer, epoch=1, rows=[3, 10, 40])
    after_epoch0: dict = {}

    def progress(metrics):
        if metrics["epoch"] == 0:
            after_epoch0.update(policy=_params(trainer.policy), value=_params(trainer.value_fn))
            after_epoch0["adam_steps"] = [s["step"].item() for s in trainer.learner.optimizer.state.values()]
            assert metrics["learner/skipped_steps"] == 0  # logged every epoch

    with pytest.raises(NonFiniteError) as info:
        trainer.fit(progress)
    err = info.value
    assert (err.kind, err.epoch, err.count, err.total) == ("reward", 1, 3, 64)
    message = str(err)
    assert "reward.name='linear'" in message
    assert "epoch 1" in message
    assert "3 of 64 samples" in message
    assert "NaN or inf" in message and "-> nan" in message
    # nothing learned from the poisoned batch: weights and optimiser state as epoch 0 left them
    _assert_equal(_params(trainer.policy), after_epoch0["policy"])
    _assert_equal(_params(trainer.value_fn), after_epoch0["value"])
    assert [s["step"].item() for s in trainer.learner.optimizer.state.values()] == after_epoch0["adam_steps"]
    assert [m["epoch"] for m in trainer.history] == [0]


def test_inf_reward_of_x0_hat_the_value_priors_input_stops_the_run(tmp_path):
    """ctrl's value function uses R(x0_hat_k) at every state (value.use_reward_prior): an inf there stops the
    run too, named as the reward prior."""
    cfg = _toy(tmp_path, "algorithm.name=ctrl")
    assert cfg.scores_x0_hat
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    batch.r_x0[5, 2] = float("inf")
    before = _params(trainer.value_fn)
    with pytest.raises(NonFiniteError, match=r"x0_hat .* for 1 of 64 samples at epoch 0") as info:
        trainer.learner.update_value(batch, epoch=0)
    assert info.value.kind == "reward_prior"
    assert "-> inf" in str(info.value)
    _assert_equal(_params(trainer.value_fn), before)


def test_value_gradient_stops_on_a_non_finite_reward_of_x0_hat_computed_in_the_learner(tmp_path):
    """The value-gradient estimator scores x0_hat itself (grad_x R(x0_hat)): a NaN there stops the run
    before the step, with the policy untouched."""
    cfg = _toy(tmp_path, "algorithm.name=ctrl", "algorithm.estimator=value_gradient")
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    reward = trainer.learner.reward_fn

    def nan_on_row_7(images, prompts):
        r = reward(images, prompts)
        return torch.where(torch.arange(len(r)) == 7, torch.full_like(r, float("nan")), r)

    trainer.learner.reward_fn = nan_on_row_7
    before = _params(trainer.policy)
    with pytest.raises(NonFiniteError, match=r"x0_hat .* 1 of 64 samples of a micro-batch at epoch 0"):
        trainer.learner.update_policy(batch, epoch=0)
    _assert_equal(_params(trainer.policy), before)


def test_rollout_with_non_finite_latents_stops_the_run(tmp_path):
    cfg = _toy(tmp_path, "algorithm.name=ddpo")
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    batch.traj.latents[9, 3, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"non-finite latents or KL .* in 1 of 64 trajectories") as info:
        trainer.learner.update_policy(batch, epoch=0)
    assert info.value.kind == "rollout"


def test_the_error_names_a_weighted_sum_and_a_pre_training_rollout(tmp_path):
    cfg = _toy(tmp_path, "algorithm.name=ctrl")
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(-1)
    batch.rewards[0] = float("-inf")
    with pytest.raises(NonFiniteError, match=r"epoch -1 \(value pre-training rollout\)"):
        trainer.learner.update_value(batch, epoch=-1)
    cfg = cfg.model_copy(deep=True)
    cfg.reward.weights = {"aesthetic": 1.0, "clip_score": 0.5}
    assert learner_module.reward_label(cfg) == "reward.weights=1*aesthetic + 0.5*clip_score"


# --------------------------------------------------------------------------------------------------
# A non-finite loss or gradient skips that step
# --------------------------------------------------------------------------------------------------


def _nan_loss_at(monkeypatch, learner: Learner, micro_batches: set[int]) -> list[dict]:
    """Make the policy loss NaN in these micro-batches (0-based, counted over the epoch); returns the
    snapshots (weights, AdamW step counts) taken at the start of every micro-batch."""
    snapshots: list[dict] = []
    steps = learner._steps
    surrogate = learner_module.clipped_surrogate

    def tracked_steps(n):
        snapshots.append(
            {
                "policy": _params(learner.policy),
                "adam": {id(p): s["step"].item() for p, s in learner.optimizer.state.items()},
            }
        )
        return steps(n)

    def poisoned(adv, log_ratio, clip_range):
        loss, clipfrac, approx_kl = surrogate(adv, log_ratio, clip_range)
        return (loss * float("nan") if len(snapshots) - 1 in micro_batches else loss), clipfrac, approx_kl

    monkeypatch.setattr(learner, "_steps", tracked_steps)
    monkeypatch.setattr(learner_module, "clipped_surrogate", poisoned)
    return snapshots


def test_a_non_finite_loss_skips_exactly_that_step_and_counts_it(tmp_path, monkeypatch):
    # 4 micro-batches of 16 in the epoch; the third one's loss is NaN
    cfg = _toy(
        tmp_path, "algorithm.name=ctrl", "algorithm.micro_batch_size=16", "algorithm.max_skipped_steps=1"
    )
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    snapshots = _nan_loss_at(monkeypatch, trainer.learner, {2})
    metrics = trainer.learner.update_policy(batch, epoch=0)
    end = {"policy": _params(trainer.policy)}
    assert len(snapshots) == 4
    assert metrics["learner/skipped_steps"] == 1
    assert math.isfinite(metrics["learner/loss"]) and math.isfinite(metrics["learner/grad_norm"])
    # steps 0, 1 and 3 moved the weights; step 2 left them (and AdamW's moments and count) bit-identical
    for moved in (1, 2):
        with pytest.raises(AssertionError):
            _assert_equal(snapshots[moved]["policy"], snapshots[moved - 1]["policy"])
    _assert_equal(snapshots[3]["policy"], snapshots[2]["policy"])
    assert snapshots[3]["adam"] == snapshots[2]["adam"] and set(snapshots[3]["adam"].values()) == {2}
    with pytest.raises(AssertionError):
        _assert_equal(end["policy"], snapshots[3]["policy"])
    assert {s["step"].item() for s in trainer.learner.optimizer.state.values()} == {3}
    assert all(torch.isfinite(p).all() for p in end["policy"].values())


def test_more_skipped_steps_than_allowed_stop_the_run(tmp_path, monkeypatch):
    cfg = _toy(
        tmp_path, "algorithm.name=ddpo", "algorithm.micro_batch_size=16", "algorithm.max_skipped_steps=1"
    )
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    snapshots = _nan_loss_at(monkeypatch, trainer.learner, {1, 2})
    with pytest.raises(NonFiniteError) as info:
        trainer.learner.update_policy(batch, epoch=4)
    err = info.value
    assert (err.kind, err.epoch, err.count, err.total) == ("skipped_steps", 4, 2, 3)
    assert "algorithm.max_skipped_steps=1" in str(err) and "epoch 4" in str(err)
    # the weights are those of the last good step (micro-batch 0)
    _assert_equal(_params(trainer.policy), snapshots[1]["policy"])


def test_max_skipped_steps_zero_stops_at_the_first_non_finite_step(tmp_path, monkeypatch):
    cfg = _toy(tmp_path, "algorithm.name=ctrl", "algorithm.max_skipped_steps=0")
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    before = _params(trainer.policy)
    _nan_loss_at(monkeypatch, trainer.learner, {0})
    with pytest.raises(NonFiniteError, match="algorithm.max_skipped_steps=0"):
        trainer.learner.update_policy(batch, epoch=0)
    _assert_equal(_params(trainer.policy), before)


def test_a_non_finite_value_loss_skips_that_value_step(tmp_path, monkeypatch):
    cfg = _toy(tmp_path, "algorithm.name=ctrl", "value.updates_per_epoch=3", "algorithm.micro_batch_size=64")
    trainer = Trainer(cfg, tmp_path)
    batch = trainer.rollout(0)
    mse, calls, snapshots = torch.nn.functional.mse_loss, [], []

    def poisoned(pred, target):
        snapshots.append(_params(trainer.value_fn))
        calls.append(1)
        return mse(pred, target) * (float("inf") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(torch.nn.functional, "mse_loss", poisoned)
    metrics = trainer.learner.update_value(batch, epoch=0)
    assert len(calls) == 3 and metrics["value/skipped_steps"] == 1
    assert math.isfinite(metrics["value/loss"])
    with pytest.raises(AssertionError):
        _assert_equal(snapshots[1], snapshots[0])
    _assert_equal(snapshots[2], snapshots[1])


# --------------------------------------------------------------------------------------------------
# The data-parallel learner path the Ray loop runs: 2 ranks all-reducing gradients (gloo)
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, cfg_dict: dict) -> None:
    """One learner rank, set up as scoreaction.distributed.learner_group.train_loop does it, then:
    (1) a batch whose only NaN rewards are in rank 1's shard; (2) a NaN loss on rank 1 only."""
    import torch.distributed as dist

    from scoreaction.ddp import GradientAllReduce, mean_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank that died would leave the other waiting in a collective: time out instead of hanging
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    result: dict = {}
    try:
        cfg = Config.model_validate(cfg_dict)
        trainer = Trainer(cfg, out_dir)  # the same seeds on both ranks: the same policy and batch
        learner = Learner(trainer.policy, trainer.value_fn, cfg, trainer.reward_fn, rank=rank, world=world)
        syncs = [
            GradientAllReduce(trainer.policy.trainable_parameters()),
            GradientAllReduce(list(trainer.value_fn.parameters())),
        ]
        batch = trainer.rollout(2)
        n = batch.traj.batch_size
        # (1) NaN rewards in the last two rows: rank 1's shard only
        poisoned = learner_module.Batch(batch.traj, batch.rewards.clone(), batch.r_x0)
        poisoned.rewards[[n - 1, n - 2]] = float("nan")
        try:
            learner.update_value(poisoned, epoch=2)
            result["reward"] = "no error"
        except NonFiniteError as exc:
            result["reward"] = (exc.kind, exc.epoch, exc.count, exc.total, str(exc))
        # (2) a NaN loss on rank 1 only, in the first of the epoch's two micro-batches
        before = _params(trainer.policy)
        calls = {"n": 0}
        surrogate = learner_module.clipped_surrogate

        def nan_on_rank1(adv, log_ratio, clip_range):
            calls["n"] += 1
            loss, clipfrac, approx_kl = surrogate(adv, log_ratio, clip_range)
            first_micro_batch = calls["n"] <= cfg.sampler.num_steps
            return (loss * float("nan") if rank == 1 and first_micro_batch else loss), clipfrac, approx_kl

        learner_module.clipped_surrogate = nan_on_rank1
        metrics = mean_over_ranks(learner.update_policy(batch, epoch=2))
        result["skipped"] = metrics["learner/skipped_steps"]
        result["adam_steps"] = sorted({s["step"].item() for s in learner.optimizer.state.values()})
        result["moved"] = any(not torch.equal(p, before[k]) for k, p in _params(trainer.policy).items())
        result["weights"] = {k: v.tolist() for k, v in _params(trainer.policy).items()}
        for s in syncs:
            s.remove()
    finally:
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def test_data_parallel_ranks_stop_together_on_a_nan_reward_and_skip_together_on_a_nan_loss(tmp_path):
    import torch.multiprocessing as mp

    cfg = _toy(
        tmp_path, "algorithm.name=ctrl", "algorithm.micro_batch_size=32", "resources.num_learner_workers=2"
    )
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path), cfg.model_dump()), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        # both ranks stop, with the count over the whole batch although rank 0's shard is clean
        kind, epoch, count, total, message = r["reward"]
        assert (kind, epoch, count, total) == ("reward", 2, 2, 64)
        assert "2 of 64 samples at epoch 2" in message
        # both ranks skip the micro-batch whose loss was NaN on rank 1 only, and step on the other
        assert r["skipped"] == 1 and r["adam_steps"] == [1] and r["moved"]
    assert results[0]["weights"] == results[1]["weights"]


# --------------------------------------------------------------------------------------------------
# Config: no inf/nan in any float field, discovered by walking the models
# --------------------------------------------------------------------------------------------------


def _has_float(annotation) -> bool:
    return annotation is float or any(_has_float(a) for a in typing.get_args(annotation))


def _sample(annotation, bad: float):
    """A value of `annotation` holding `bad` where a float goes."""
    if annotation is float:
        return bad
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [_sample(args[0], bad)]
    if origin is dict:
        key = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is typing.Literal else "x"
        return {key: _sample(args[1], bad)}
    member = next(a for a in args if _has_float(a))  # a union (float | None, float | list[float], ...)
    return _sample(member, bad)


def _float_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = next(
            (a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if sub is not None:
            out += _float_fields(sub, f"{prefix}{name}.")
        elif _has_float(ann):
            out.append((f"{prefix}{name}", ann))
    return out


FLOAT_FIELDS = _float_fields(Config)


def test_the_walk_finds_the_float_fields_of_every_section():
    names = {name for name, _ in FLOAT_FIELDS}
    sections = {name.split(".")[0] for name in names}
    assert sections == {"model", "policy", "sampler", "reward", "algorithm", "value", "resources"}
    assert {
        "algorithm.learning_rate",
        "algorithm.kl_coef",
        "algorithm.clip_range",
        "algorithm.max_grad_norm",
        "algorithm.adv_clip",
        "reward.direction",
        "sampler.guidance_scale",
        "sampler.eta",
        "value.learning_rate",
        "model.toy.std",
        "resources.rollout_resources",
    } <= names


def _nested(dotted: str, value) -> dict:
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize(("name", "annotation"), FLOAT_FIELDS, ids=[n for n, _ in FLOAT_FIELDS])
def test_config_rejects_inf_and_nan_in_every_float_field(name, annotation, bad):
    from scoreaction.config import _merge, preset, validate_config

    with pytest.raises(ConfigError) as info:
        validate_config(_merge(preset("tiny"), _nested(name, _sample(annotation, bad))))
    message = str(info.value)
    # one line naming the field (a list item or dict value by its index or key), the value, what is allowed
    lines = message.splitlines()[1:]
    assert len(lines) == 1, message
    assert lines[0].startswith(f"  {name}") and f"={bad!r}: " in lines[0], message
    assert lines[0].endswith("must be a finite number (NaN and +-inf are not allowed)"), message


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "inf", "nan", "1e999"])
def test_inf_and_nan_from_the_command_line_are_rejected(text):
    with pytest.raises(ConfigError, match=r"algorithm.kl_coef=.*: must be a finite number"):
        build_config("tiny", overrides=[f"algorithm.kl_coef={text}"])
