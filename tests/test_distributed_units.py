"""The distributed layer's pure parts, without Ray: resource plan, resume state, atomic checkpoints, seeding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from scoreaction.builders import build_policy, epoch_prompts
from scoreaction.config import ConfigError, build_config
from scoreaction.distributed.driver import _threads, one_host_threads
from scoreaction.distributed.plan import (
    NodeInfo,
    PlanError,
    build_plan,
    check_fit,
    format_plan,
    validate_layout,
)
from scoreaction.rollouts import batch_bounds, batch_seed, sample_batch
from scoreaction.run_folder import (
    ResumeError,
    config_differences,
    flatten_state,
    latest_step,
    latest_step_dir,
    publish_latest,
    read_training_checkpoint,
    unflatten_state,
    write_training_checkpoint,
)
from scoreaction.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str, preset: str = "toy-gmm"):
    return build_config(preset, overrides=list(overrides))


# --------------------------------------------------------------------------------------------------
# Resource plan
# --------------------------------------------------------------------------------------------------


def test_plan_totals_and_placement_on_gpu_nodes():
    cfg = _cfg(
        "resources.num_rollout_workers=2",
        "resources.rollout_gpus=1",
        "resources.learner_gpus=0.5",
        "resources.reward_gpus=0.25",
    )
    plan = build_plan(cfg)
    # 2 x 1 + 0.5 + 0.25 GPUs; 2 + 1 + 1 CPUs
    assert plan.total() == {"CPU": 4.0, "GPU": 2.75}
    nodes = [
        NodeInfo("head", "10.0.0.1", {"CPU": 8.0}),
        NodeInfo("gpu-a", "10.0.0.2", {"CPU": 4.0, "GPU": 2.0}),
        NodeInfo("gpu-b", "10.0.0.3", {"CPU": 4.0, "GPU": 1.0}),
    ]
    placed = check_fit(plan, nodes)
    where = {(name, i): node for name, i, node in placed}
    assert {where[("RolloutWorker", 0)], where[("RolloutWorker", 1)]} <= {"gpu-a", "gpu-b"}
    text = format_plan(cfg, plan, nodes, "test cluster", "/tmp/ckpt")
    assert "fits: yes" in text and "RolloutWorker" in text and "FailureConfig(max_failures=2)" in text


def test_plan_asking_for_more_gpus_than_the_cluster_has_names_the_fields():
    cfg = _cfg("resources.num_rollout_workers=2", "resources.rollout_gpus=1")
    with pytest.raises(PlanError) as exc:
        check_fit(build_plan(cfg), [NodeInfo("local", "127.0.0.1", {"CPU": 4.0, "GPU": 0.0})])
    msg = str(exc.value)
    assert "2 GPU" in msg and "resources.rollout_gpus=1 x resources.num_rollout_workers=2" in msg
    assert "the cluster has 0 GPU" in msg


def test_plan_fails_when_no_single_node_holds_an_actor():
    cfg = _cfg("resources.rollout_gpus=2")
    nodes = [NodeInfo("a", "1", {"CPU": 4.0, "GPU": 1.0}), NodeInfo("b", "2", {"CPU": 4.0, "GPU": 1.0})]
    with pytest.raises(PlanError, match=r"RolloutWorker #0 needs CPU 1, GPU 2 on one node"):
        check_fit(build_plan(cfg), nodes)


def test_layout_checks_name_fields():
    # the learner split is a config error (scoreaction/config/schema.py), raised before any plan is made
    with pytest.raises(
        ConfigError, match=r"run.num_samples=4095 must be divisible by resources.num_learner_workers=2"
    ):
        _cfg("run.num_samples=4095", "resources.num_learner_workers=2")
    with pytest.raises(ConfigError, match=r"algorithm.micro_batch_size=3 must be divisible"):
        _cfg("algorithm.micro_batch_size=3", "resources.num_learner_workers=2")
    with pytest.raises(PlanError, match="backend='nccl' needs GPUs"):
        validate_layout(_cfg("resources.backend=nccl"))


def test_custom_resources_reject_cpu_key():
    with pytest.raises(Exception, match="has its own field"):
        _cfg("resources.rollout_resources={CPU: 1}")


def test_one_host_threads_split_the_cores_between_actors_that_run_together():
    # 32 samples in batches of 16: one rollout worker samples the second batch while the first is scored, so
    # rollout and reward actors split the cores; the learner workers run alone and split them all
    cfg = _cfg(preset="tiny")
    assert (cfg.run.num_samples, cfg.sampler.batch_size) == (32, 16)
    assert one_host_threads(cfg, 2) == {"rollout": 1, "reward": 1, "learner": 2}
    cfg = _cfg(
        "resources.num_rollout_workers=2",
        "resources.num_learner_workers=2",
        "run.num_samples=64",
        preset="tiny",
    )
    assert one_host_threads(cfg, 16) == {"rollout": 5, "reward": 5, "learner": 8}
    assert one_host_threads(cfg, 1) == {"rollout": 1, "reward": 1, "learner": 1}
    # one batch per rollout worker: scoring starts when sampling is over, so nothing overlaps
    cfg = _cfg("resources.num_rollout_workers=2", "resources.num_reward_workers=2", preset="tiny")
    assert one_host_threads(cfg, 8) == {"rollout": 4, "reward": 4, "learner": 8}
    cfg = _cfg("run.num_samples=16", preset="tiny")
    assert one_host_threads(cfg, 2) == {"rollout": 2, "reward": 2, "learner": 2}
    # an explicit number or resources.torch_threads wins over a kind's share; a kind left out takes the CPUs
    assert _threads({"rollout": 3}, "rollout", None, 1.0) == 3
    assert _threads({"rollout": 3}, "reward", None, 2.5) == 3
    assert _threads({"rollout": 3}, "reward", 4, 2.5) == 4
    assert _threads(2, "learner", 4, 1.0) == 2


# --------------------------------------------------------------------------------------------------
# Seeding and prompts
# --------------------------------------------------------------------------------------------------


def test_epoch_prompts_run_round_robin_across_epochs():
    # the single-process Trainer and the rollout workers both take an epoch's prompts from epoch_prompts
    cfg = _cfg("run.num_samples=2", "run.prompts=[a, b, c]", preset="tiny")
    assert [epoch_prompts(cfg, e) for e in (0, 1, 2, -1)] == [["a", "b"], ["c", "a"], ["b", "c"], ["b", "c"]]
    assert epoch_prompts(cfg, 1, num_samples=1) == ["c"]


def test_rollout_batch_seeds_are_distinct_and_pinned():
    seeds = {batch_seed(0, e, c) for e in range(-3, 50) for c in range(8)}
    assert len(seeds) == 53 * 8
    # pinned: a checkpoint resumed by a later version must re-sample the same batches
    assert batch_seed(5, 2, 1) == 900440345463790919 and batch_seed(0, -1, 0) == 4225262544757542132
    assert batch_seed(6, 2, 1) != batch_seed(5, 2, 1)
    assert batch_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_a_rollout_batch_depends_only_on_seed_epoch_and_index():
    """The same batch whoever samples it (another worker, a restarted one, the in-process backend)."""
    cfg = _cfg("sampler.num_steps=3")
    a, b = build_policy(cfg), build_policy(cfg)
    first = sample_batch(a, cfg, 2, 1, ["x"] * 4)
    sample_batch(b, cfg, 0, 0, ["x"] * 4)  # b's generators have moved on: no effect on the next batch
    again = sample_batch(b, cfg, 2, 1, ["x"] * 4)
    other = sample_batch(a, cfg, 2, 0, ["x"] * 4)
    assert torch.equal(first.latents, again.latents)
    assert not torch.equal(first.latents, other.latents)


# --------------------------------------------------------------------------------------------------
# Resume state without pickle
# --------------------------------------------------------------------------------------------------


def test_learner_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    cfg = _cfg(
        "run.num_samples=64", "run.epochs=2", "algorithm.micro_batch_size=32", f"run.output_dir={tmp_path}"
    )
    trainer = Trainer(cfg)
    trainer.fit()  # the optimisers now hold moments and step counts
    state = trainer.learner.state_dict()
    tensors, skeleton = flatten_state(state)
    json.dumps(skeleton)  # JSON-able
    back = unflatten_state(tensors, json.loads(json.dumps(skeleton)))
    opt, opt_back = state["optimizer"], back["optimizer"]
    assert set(opt_back["state"]) == set(opt["state"])  # int keys survive
    assert opt_back["param_groups"][0]["betas"] == opt["param_groups"][0]["betas"]  # tuples too
    for k, s in opt["state"].items():
        for name, v in s.items():
            assert torch.equal(opt_back["state"][k][name], v)
    assert torch.equal(back["generator"], state["generator"])
    fresh = Trainer(cfg)
    fresh.learner.load_state_dict(back)
    assert torch.equal(fresh.learner.generator.get_state(), trainer.learner.generator.get_state())


def test_config_differences_allow_epochs_and_resources_only():
    a = _cfg().model_dump()
    b = _cfg(
        "run.epochs=99",
        "resources.num_rollout_workers=3",
        "run.output_dir=/x",
        "algorithm.max_skipped_steps=5",
    ).model_dump()
    assert config_differences(a, b) == []
    c = _cfg("algorithm.learning_rate=0.5").model_dump()
    assert config_differences(a, c) == ["algorithm.learning_rate: 0.003 -> 0.5"]


# --------------------------------------------------------------------------------------------------
# Atomic checkpoints: kill -9 while saving
# --------------------------------------------------------------------------------------------------

SAVER = textwrap.dedent(
    """
    import sys, torch
    from scoreaction.builders import build_policy, build_value_function
    from scoreaction.config import build_config
    from scoreaction.learner import Learner
    from scoreaction.run_folder import latest_step, publish_latest, write_training_checkpoint
    cfg = build_config("toy-gmm", overrides=["model.toy.hidden=256"])
    policy = build_policy(cfg)
    learner = Learner(policy, build_value_function(cfg, policy), cfg)
    step = max(latest_step(sys.argv[1]), 0)  # continue after what 'latest' names
    print("ready", flush=True)
    while True:
        step += 1
        with torch.no_grad():
            for p in policy.trainable_parameters():
                p.fill_(float(step))
        state = learner.state_dict()
        state["ranks"] = [{"tracker": state.pop("tracker"), "generator": state.pop("generator")}]
        path = write_training_checkpoint(sys.argv[1], step, policy, state, {"epoch": step, "history": []})
        publish_latest(sys.argv[1], path)
    """
)


def test_kill_9_during_saves_never_leaves_a_broken_latest(tmp_path):
    from scoreaction.checkpoint import load_checkpoint

    ckpt = tmp_path / "checkpoints"
    cfg = _cfg("model.toy.hidden=256")
    policy = build_policy(cfg)
    last = 0
    for delay in (0.31, 0.47, 0.73):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(ckpt)], stdout=subprocess.PIPE, cwd=ROOT)
        assert proc.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 120  # a loaded machine: wait for this saver's first save first
        while latest_step(ckpt) <= last and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(delay)  # the loop spends nearly all its time inside a save
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        latest = latest_step_dir(ckpt)
        assert latest is not None
        _, progress = read_training_checkpoint(latest)
        load_checkpoint(policy, latest)  # loads: complete weights and metadata
        step = progress["epoch"]
        assert all(torch.all(p == float(step)) for p in policy.trainable_parameters())
        assert step > last
        last = step
        # a restarted run may never rewrite what 'latest' names
        with pytest.raises(ResumeError, match="refusing to write"):
            write_training_checkpoint(ckpt, step, policy, {}, {"epoch": step})
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith(".")]
    # staging folders of killed saves may remain (hidden, never named by latest) until the next start
    assert all(".staging-" in n or ".tmp-" in n for n in leftovers)
    from scoreaction.run_folder import clean_leftovers

    assert clean_leftovers(ckpt) == sorted(leftovers)
    assert [p.name for p in ckpt.iterdir() if p.name.startswith(".")] == []
    assert read_training_checkpoint(latest_step_dir(ckpt))[1]["epoch"] == last


def test_publish_latest_moves_only_to_complete_folders(tmp_path):
    cfg = _cfg()
    from scoreaction.builders import build_value_function
    from scoreaction.learner import Learner

    policy = build_policy(cfg)
    learner = Learner(policy, build_value_function(cfg, policy), cfg)
    state = learner.state_dict()
    state["ranks"] = [{"tracker": state.pop("tracker"), "generator": state.pop("generator")}]
    p1 = write_training_checkpoint(tmp_path, 1, policy, state, {"epoch": 1, "history": []})
    publish_latest(tmp_path, p1)
    assert latest_step_dir(tmp_path) == p1
    p2 = write_training_checkpoint(tmp_path, 2, policy, state, {"epoch": 2, "history": []})
    assert latest_step_dir(tmp_path) == p1  # written, not yet published
    publish_latest(tmp_path, p2)
    assert latest_step_dir(tmp_path) == p2
    (p2 / "progress.json").unlink()  # incomplete: 'latest' falls back to the newest complete one
    assert latest_step_dir(tmp_path) == p1


# --------------------------------------------------------------------------------------------------
# Gradient all-reduce across two gloo ranks
# --------------------------------------------------------------------------------------------------


def _allreduce_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from scoreaction.ddp import GradientAllReduce, mean_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    sync = GradientAllReduce(list(model.parameters()))
    half = x[rank * 4 : (rank + 1) * 4]
    # two backward passes accumulate into .grad, as the learner does once per trained step
    model(half).pow(2).mean().backward()
    model(half).sin().mean().backward()
    from safetensors.torch import save_file

    save_file(
        {str(i): p.grad for i, p in enumerate(model.parameters())}, f"{out_dir}/grads{rank}.safetensors"
    )
    m = mean_over_ranks({"loss": float(rank)})
    assert m == {"loss": 0.5} and sync.calls == 2
    dist.destroy_process_group()


def test_gradient_allreduce_over_two_ranks_equals_the_full_batch_gradient(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_allreduce_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).mean().backward()
    model(x).sin().mean().backward()
    for rank in (0, 1):
        from safetensors.torch import load_file

        grads = load_file(str(tmp_path / f"grads{rank}.safetensors"))
        for i, p in enumerate(model.parameters()):
            torch.testing.assert_close(grads[str(i)], p.grad, rtol=1e-6, atol=1e-7)
