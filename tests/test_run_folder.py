"""Run folders (scoreaction.run_folder), without Ray: one owner, one `latest` with a fallback, no non-finite
checkpoint, leftovers of killed saves cleaned, run.keep_checkpoints, storage_path runs kept apart, the running
reward normaliser checkpointed, and a single-process run that resumes to the very numbers of an
uninterrupted one."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scoreaction.builders import build_policy, build_value_function
from scoreaction.checkpoint import latest_checkpoint, latest_in
from scoreaction.config import build_config
from scoreaction.distributed.actors import RewardWorker
from scoreaction.learner import Learner
from scoreaction.rewards import WeightedSum
from scoreaction.rewards.base import Reward, RewardOutput
from scoreaction.run_folder import (
    LOCK_FILE,
    NonFiniteCheckpointError,
    ResumeError,
    RunLock,
    RunLockedError,
    checkpoint_dir_for,
    load_reward_stats,
    open_run,
    publish_latest,
    reward_stats_state,
    write_training_checkpoint,
)
from scoreaction.scoring import normalize_running
from scoreaction.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "run.num_samples=64",
    "sampler.num_steps=4",
    "sampler.batch_size=64",
    "algorithm.micro_batch_size=32",
    "value.pretrain_epochs=1",
]


def _cfg(*overrides: str):
    return build_config("toy-gmm", overrides=[*FAST, *overrides])


def _state(cfg, policy):
    learner = Learner(policy, build_value_function(cfg, policy), cfg)
    state = learner.state_dict()
    state["ranks"] = [{"tracker": state.pop("tracker"), "generator": state.pop("generator")}]
    return state


def _save(ckpt, step, policy, state):
    path = write_training_checkpoint(ckpt, step, policy, state, {"epoch": step, "history": []})
    publish_latest(ckpt, path)
    return path


# --------------------------------------------------------------------------------------------------
# Non-finite checkpoints
# --------------------------------------------------------------------------------------------------


def test_a_non_finite_checkpoint_is_refused_and_latest_stays(tmp_path):
    cfg = _cfg()
    policy = build_policy(cfg)
    state = _state(cfg, policy)
    good = _save(tmp_path, 1, policy, state)
    param = policy.trainable_parameters()[0]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=r"policy\.") as info:
        _save(tmp_path, 2, policy, state)
    assert "latest' still names the last good checkpoint" in str(info.value)
    assert latest_in(tmp_path, training=True) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_000001"]  # nothing else written
    # a non-finite training-state tensor is named too
    with torch.no_grad():
        param.view(-1)[0] = 0.0
    state["value_fn"][next(iter(state["value_fn"]))] = torch.tensor([float("inf")])
    with pytest.raises(NonFiniteCheckpointError, match=r"state\.value_fn\."):
        _save(tmp_path, 2, policy, state)
    assert latest_in(tmp_path, training=True) == good


# --------------------------------------------------------------------------------------------------
# One owner
# --------------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_owner_refuses_a_second_job_and_a_stale_lock_is_taken_over(tmp_path, caplog):
    root = tmp_path / "run"
    first = RunLock(root).acquire()
    try:
        rec = json.loads((root / LOCK_FILE).read_text())
        assert rec["run_id"] == first.run_id and rec["pid"] == os.getpid()
        assert rec["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match="owned by a live job") as info:
            RunLock(root).acquire()
        assert first.run_id in str(info.value) and str(os.getpid()) in str(info.value)
        # open_run refuses it too, before touching anything
        with pytest.raises(RunLockedError):
            open_run(_cfg(f"run.output_dir={root}"), root, resume=False)
    finally:
        first.release()
    assert not (root / LOCK_FILE).exists()

    # a dead pid on this host: taken over, with a log line
    dead = {
        "run_id": "dead-run",
        "host": socket.gethostname(),
        "pid": _dead_pid(),
        "heartbeat_at": time.time(),
    }
    (root / LOCK_FILE).write_text(json.dumps(dead))
    with caplog.at_level(logging.WARNING, logger="scoreaction.run_folder"):
        lock = RunLock(root).acquire()
    assert "taking over the stale lock" in caplog.text and "dead-run" in caplog.text
    assert json.loads((root / LOCK_FILE).read_text())["run_id"] == lock.run_id
    lock.release()

    # a job whose lock was taken over (it looked dead) publishes nothing more, and leaves the new lock alone
    zombie = RunLock(root).acquire()
    zombie.check()
    taken = {**json.loads((root / LOCK_FILE).read_text()), "run_id": "new-owner"}
    (root / LOCK_FILE).write_text(json.dumps(taken))
    with pytest.raises(RunLockedError, match="no longer owned"):
        zombie.check()
    zombie.release()
    assert json.loads((root / LOCK_FILE).read_text())["run_id"] == "new-owner"
    (root / LOCK_FILE).unlink()

    # another host: its heartbeat decides
    fresh = {"run_id": "remote", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time(), "lease_s": 60}
    (root / LOCK_FILE).write_text(json.dumps(fresh))
    with pytest.raises(RunLockedError, match="remote"):
        RunLock(root).acquire()
    (root / LOCK_FILE).write_text(json.dumps({**fresh, "heartbeat_at": time.time() - 3600}))
    lock = RunLock(root).acquire()
    assert json.loads((root / LOCK_FILE).read_text())["run_id"] == lock.run_id
    lock.release()


# --------------------------------------------------------------------------------------------------
# latest: fallback, leftovers, retention
# --------------------------------------------------------------------------------------------------


def test_latest_missing_or_corrupt_falls_back_to_the_newest_complete_step(tmp_path):
    cfg = _cfg()
    policy = build_policy(cfg)
    state = _state(cfg, policy)
    one, two = _save(tmp_path, 1, policy, state), _save(tmp_path, 2, policy, state)
    assert latest_in(tmp_path, training=True) == two
    (tmp_path / "latest").write_bytes(b"\xff\xfe garbage")
    assert latest_in(tmp_path, training=True) == two
    (tmp_path / "latest").write_text("step_000009\n")  # names nothing
    assert latest_in(tmp_path, training=True) == two
    (tmp_path / "latest").unlink()
    assert latest_in(tmp_path, training=True) == two
    # a truncated file (size differs from the manifest in progress.json) makes a step incomplete
    weights = two / "toy_policy.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    assert latest_in(tmp_path, training=True) == one
    assert latest_checkpoint(tmp_path.parent) is None  # this folder is not <run>/checkpoints
    (two / "progress.json").write_text("{not json")
    assert latest_in(tmp_path) == one


def test_leftovers_of_a_killed_save_are_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg("run.epochs=1", f"run.output_dir={out}")
    Trainer(cfg, out).fit()
    ckpt = out / "checkpoints"
    leftovers = [
        ckpt / ".staging-step_000002-1234abcd",
        ckpt / ".step_000002.tmp-1234abcd",
        ckpt / ".step_000001.old-1234abcd",
    ]
    for d in leftovers:
        d.mkdir()
        (d / "toy_policy.safetensors").write_bytes(b"partial")
    (ckpt / ".latest.tmp-1234abcd").write_text("step_000002")
    (out / ".run.lock.tmp-1234abcd").write_text("{}")
    folder = open_run(
        build_config("toy-gmm", overrides=[*FAST, "run.epochs=1", f"run.output_dir={out}"]), out, True
    )
    try:
        assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000001"]
        assert not (out / ".run.lock.tmp-1234abcd").exists()
        assert folder.resume_from == ckpt / "step_000001"
    finally:
        folder.close()


def test_keep_checkpoints_bounds_the_disk_and_never_drops_latest(tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg("run.epochs=4", "run.checkpoint_every=1", "run.keep_checkpoints=2"), out).fit()
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000003", "step_000004"]
    assert (ckpt / "latest").read_text().strip() == "step_000004"
    # keep=1 never drops what latest names, nor a newer step
    publish_latest(ckpt, ckpt / "step_000003", keep=1)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000003", "step_000004"]


def test_same_basename_under_one_storage_path_never_shares_checkpoints(tmp_path):
    storage = tmp_path / "shared"
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    cfg_a = _cfg("run.epochs=1", f"run.storage_path={storage}", f"run.output_dir={a}")
    cfg_b = _cfg("run.epochs=1", f"run.storage_path={storage}", f"run.output_dir={b}", "run.seed=5")
    assert checkpoint_dir_for(cfg_a, a) == storage / "run" / "checkpoints"  # the readable name first
    Trainer(cfg_a, a).fit()
    dir_b = checkpoint_dir_for(cfg_b, b)
    assert dir_b != checkpoint_dir_for(cfg_a, a) and dir_b.parent.name.startswith("run-")
    Trainer(cfg_b, b).fit()  # not refused as "already holds checkpoints": its own folder
    assert checkpoint_dir_for(cfg_a, a) == storage / "run" / "checkpoints"  # stable for resume
    assert checkpoint_dir_for(cfg_b, b) == dir_b
    wa = load_file(str(latest_in(storage / "run" / "checkpoints") / "toy_policy.safetensors"))
    wb = load_file(str(latest_in(dir_b) / "toy_policy.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ResumeError, match="URIs are not supported"):
        checkpoint_dir_for(_cfg("run.storage_path=s3://bucket/x"), a)


# --------------------------------------------------------------------------------------------------
# The running reward normaliser
# --------------------------------------------------------------------------------------------------


class _Part(Reward):
    """A deterministic part reward on any tensor (no image checks): a fixed projection of each sample."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def score(self, images, prompts):
        return RewardOutput(self.scale * images.flatten(1).float().sum(1) + self.scale**2)


def _weighted_sum() -> WeightedSum:
    return WeightedSum({"a": _Part(1.0), "b": _Part(-3.0)}, {"a": 0.5, "b": 2.0}, "running")


def test_running_normaliser_state_round_trips_and_the_learner_reproduces_the_reward_workers_sum():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 2, 2, generator=g) for _ in range(4)]
    reference = _weighted_sum()
    expected = [reference(x, [""] * 8) for x in batches]

    # the learner's normalisation of raw part scores = WeightedSum's own, batch by batch
    learner_side = _weighted_sum()
    for x, want in zip(batches, expected, strict=True):
        raw = {name: part.score(x, None).scores for name, part in learner_side.parts.items()}
        got, _ = normalize_running(learner_side, raw)
        assert torch.equal(got, want)

    # checkpointed after two batches, restored into a fresh one: the same numbers afterwards
    first = _weighted_sum()
    for x in batches[:2]:
        first(x, [""] * 8)
    state = json.loads(json.dumps(reward_stats_state(first)))  # through JSON, as in a checkpoint
    restored = _weighted_sum()
    load_reward_stats(restored, state)
    for x, want in zip(batches[2:], expected[2:], strict=True):
        assert torch.equal(restored(x, [""] * 8), want)
        assert torch.equal(first(x, [""] * 8), want)
    # a fresh normaliser (a restarted worker that did not restore the statistics) gives other numbers
    assert not torch.equal(_weighted_sum()(batches[2], [""] * 8), expected[2])
    with pytest.raises(ResumeError, match="running reward statistics"):
        load_reward_stats(WeightedSum({"c": _Part(1.0)}, {"c": 1.0}, "running"), state)


def test_a_restarted_reward_worker_scores_as_before_raw_parts_are_stateless():
    cfg = _cfg("value.use_reward_prior=false")
    trainer = Trainer(cfg, "unused")
    traj = trainer.rollout(0).traj
    worker = RewardWorker(cfg.model_dump(), 0, reward_factory=lambda c: _weighted_sum())
    first = worker.score(0, 0, traj).rewards
    assert set(first) == {"a", "b"}  # raw parts: the learner normalises them
    again = RewardWorker(cfg.model_dump(), 0, reward_factory=lambda c: _weighted_sum())  # "restarted"
    second = again.score(0, 0, traj).rewards
    assert all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------------------------------
# Single-process resume == uninterrupted
# --------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _weights(out):
    return load_file(str(latest_checkpoint(out) / "toy_policy.safetensors"))


@pytest.mark.parametrize("extra", [[], ["algorithm.name=ddpo", "algorithm.estimator=ratio"]])
def test_single_process_resume_equals_the_uninterrupted_run(tmp_path, extra):
    over = ["run.epochs=5", "run.checkpoint_every=2", "algorithm.lr_schedule=cosine", *extra]
    clean = Trainer(_cfg(*over), tmp_path / "clean").fit()

    out = tmp_path / "cut"

    def stop_at_3(m):
        if m["epoch"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(_cfg(*over), out).fit(stop_at_3)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert not (out / LOCK_FILE).exists()  # released on the way out
    with pytest.raises(ResumeError, match="already holds a run's checkpoints"):
        Trainer(_cfg(*over), out).fit()
    # a longer run with a decaying schedule is refused, and says why
    with pytest.raises(ResumeError, match=r"lr_schedule='cosine'.*Refused"):
        Trainer(_cfg(*over, "run.epochs=8"), out).fit(resume=True)
    resumed = Trainer(_cfg(*over), out).fit(resume=True)
    assert [m["epoch"] for m in resumed["per_epoch"]] == list(range(5))
    assert resumed["per_epoch"] == [
        {**m, "perf/epoch_s": r["perf/epoch_s"]}
        for m, r in zip(clean["per_epoch"], resumed["per_epoch"], strict=True)
    ]
    assert resumed["final"] == clean["final"] and resumed["samples"] == clean["samples"]
    a, b = _weights(tmp_path / "clean"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_more_epochs_at_a_constant_rate_is_allowed(tmp_path, caplog):
    out = tmp_path / "run"
    Trainer(_cfg("run.epochs=2", "algorithm.lr_schedule=constant"), out).fit()
    with caplog.at_level(logging.INFO, logger="scoreaction.run_folder"):
        summary = Trainer(_cfg("run.epochs=3", "algorithm.lr_schedule=constant"), out).fit(resume=True)
    assert "keeps its meaning" in caplog.text
    assert [m["epoch"] for m in summary["per_epoch"]] == [0, 1, 2]


def test_finetune_single_process_resume_passes_through(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "jobs"))
    import finetune

    out = tmp_path / "run"
    sets = [a for o in [*FAST, "run.epochs=2", "run.checkpoint_every=1"] for a in ("--set", o)]
    base = ["--single-process", "--preset", "toy-gmm", *sets, "--output-dir", str(out)]
    assert finetune.main(base) == 0
    assert finetune.main([*base, "--resume", "--set", "run.epochs=3"]) == 2  # cosine lr: refused, says why
    assert "lr_schedule='cosine'" in capsys.readouterr().err
    assert finetune.main([*base, "--resume"]) == 0  # already at epoch 2 of 2: evaluates and ends
    summary = json.loads((out / "summary.json").read_text())
    assert [m["epoch"] for m in summary["per_epoch"]] == [0, 1]


def test_a_resumed_run_may_carry_another_preset_label_but_no_other_setting():
    """run.preset is a label (the settings a preset gave are compared one by one): a checkpoint whose
    config has no run.preset, or another name for the same settings, resumes; a changed setting is
    still named."""
    from scoreaction.run_folder import config_differences

    saved = build_config("tiny").model_dump()
    del saved["run"]["preset"]
    assert config_differences(saved, build_config("tiny").model_dump()) == []
    changed = build_config("tiny", overrides=["sampler.num_steps=7"]).model_dump()
    assert config_differences(saved, changed) == ["sampler.num_steps: 20 -> 7"]
