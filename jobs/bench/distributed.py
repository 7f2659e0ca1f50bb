"""Suite `distributed`: what Ray adds to an epoch, how much scoring overlaps sampling, weight-sync latency,
and rollout throughput with 1 and 2 rollout workers.

Every distributed number comes from a real run of ``run_distributed`` on a local Ray started here, and every
baseline from the single-process ``Trainer`` in the same invocation (first), on the same config and seed.
Epoch times are medians over ``repeats`` epochs after one warm-up epoch. The epoch breakdown (rollout,
reward wait, fetch, value, policy, weight sync, idle) is printed to stderr.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time

import torch

from bench.common import Result, result
from scoreaction.config import Config, build_config

CPUS = os.cpu_count() or 1
BREAKDOWN = (
    "perf/rollout_s",
    "perf/reward_wait_s",
    "perf/fetch_s",
    "perf/value_s",
    "perf/policy_s",
    "perf/weight_sync_s",
    "perf/idle_s",
)


def _cfg(preset: str, repeats: int, *extra: str) -> Config:
    return build_config(
        preset,
        overrides=[
            f"run.epochs={repeats + 1}",
            "run.checkpoint_every=1000",
            "run.grid_every=1000",
            "resources.max_learner_failures=0",
            *extra,
        ],
    )


def _single_process_around(cfg: Config, repeats: int, between) -> tuple[float, object]:
    """Median single-process epoch time, half of the epochs timed before `between()` and half after (the
    machine's load drifts; this spreads it over both sides); returns (median, between's result)."""
    from scoreaction.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        trainer = Trainer(cfg, d)
        trainer.epoch(0)  # warm-up
        first = (repeats + 1) // 2
        times = [trainer.epoch(e)["perf/epoch_s"] for e in range(1, first + 1)]
        middle = between()
        times += [trainer.epoch(e)["perf/epoch_s"] for e in range(first + 1, repeats + 1)]
        return statistics.median(times), middle


def _distributed_epochs(cfg: Config, threads, reward_factory=None) -> list[dict]:
    from scoreaction.distributed.driver import run_distributed
    from scoreaction.reporter import EpochDone

    events: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        cfg = cfg.model_copy(deep=True)
        cfg.run.output_dir = d
        run_distributed(
            cfg,
            d,
            threads=threads,
            reward_factory=reward_factory,
            progress_bar=False,
            on_event=lambda e: events.append(e.metrics) if isinstance(e, EpochDone) else None,
        )
    epochs = sorted(events, key=lambda m: m["epoch"])
    return epochs[1:]  # drop the warm-up epoch


def _median(epochs: list[dict], key: str) -> float:
    return statistics.median(m[key] for m in epochs)


def _print_breakdown(label: str, epochs: list[dict]) -> None:
    parts = ", ".join(f"{k.split('/')[1][:-2]} {_median(epochs, k):.3f}" for k in BREAKDOWN)
    print(f"[distributed] {label}: epoch {_median(epochs, 'perf/epoch_s'):.3f} s = {parts}", file=sys.stderr)


def overhead(repeats: int) -> list[Result]:
    """Distributed epoch (1 rollout worker, 1 learner worker) over the single-process epoch, same work."""
    from scoreaction.distributed.driver import one_host_threads

    out = []
    cases = [
        ("tiny", ["resources.num_rollout_workers=1"]),
        (
            "tiny_128px",
            [
                "resources.num_rollout_workers=1",
                "sampler.height=128",
                "sampler.width=128",
                "run.num_samples=16",
            ],
        ),
    ]
    for label, extra in cases:
        cfg = _cfg("tiny", repeats, *extra)
        # the threads jobs/finetune.py gives each actor on a local Ray; the single process uses every core
        threads = one_host_threads(cfg, CPUS)
        base, epochs = _single_process_around(
            cfg, repeats, lambda cfg=cfg, threads=threads: _distributed_epochs(cfg, threads=threads)
        )
        print(
            f"[distributed] {label}: torch threads per actor {threads}, single process {CPUS}",
            file=sys.stderr,
        )
        _print_breakdown(label, epochs)
        dist_s = _median(epochs, "perf/epoch_s")
        out.append(result(f"distributed/{label}/epoch_s_over_single_process", dist_s, "s", base, "<= 1.15"))
        # Ray's own share of the distributed epoch: fetching the batch from the object store, publishing
        # the weights, and time in none of the phases (reward_wait is scoring work that did not overlap)
        ray_s = statistics.median(
            sum(m[k] for k in ("perf/fetch_s", "perf/weight_sync_s", "perf/idle_s")) for m in epochs
        )
        out.append(result(f"distributed/{label}/ray_share_of_epoch", ray_s, "s", dist_s, "<= 0.15"))
    return out


def _slow_reward_factory(seconds: float):
    """A reward that costs `seconds` of one busy core per call (JPEG sizes in a loop): a stand-in for a
    reward model as costly as sampling the batch."""

    def factory(cfg):
        from scoreaction.rewards import build_reward

        torch.set_num_threads(1)
        base = build_reward(cfg.reward)

        def reward(images, prompts):
            end = time.perf_counter() + seconds
            r = base(images, prompts)
            while time.perf_counter() < end:
                base(images, prompts)
            return r

        return reward

    return factory


def overlap(repeats: int) -> list[Result]:
    """Reward cost ~ rollout cost per batch: epoch time over (rollout + update) with streaming scoring."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # no reward prior here: it would score every x0_hat_k too, i.e. N + 1 rewards per trajectory
    cfg = _cfg(
        "tiny",
        repeats,
        "run.num_samples=64",
        "sampler.batch_size=4",
        "algorithm.micro_batch_size=16",
        "value.use_reward_prior=false",
    )
    # one rollout batch, one thread: what the rollout worker spends per batch
    from scoreaction.builders import build_policy
    from scoreaction.sampling import sample_trajectories

    torch.set_num_threads(1)
    policy = build_policy(cfg)
    prompts = cfg.run.prompts[:1] * cfg.sampler.batch_size
    sample_trajectories(policy, prompts, cfg.sampler, torch.Generator().manual_seed(0), record_reference=True)
    t0 = time.perf_counter()
    sample_trajectories(policy, prompts, cfg.sampler, torch.Generator().manual_seed(1), record_reference=True)
    per_batch = time.perf_counter() - t0
    torch.set_num_threads(CPUS)
    epochs = _distributed_epochs(cfg, threads=1, reward_factory=_slow_reward_factory(per_batch))
    _print_breakdown(f"overlap (reward {per_batch:.3f} s per batch of {cfg.sampler.batch_size})", epochs)
    epoch = _median(epochs, "perf/epoch_s")
    work = (
        _median(epochs, "perf/rollout_s") + _median(epochs, "perf/value_s") + _median(epochs, "perf/policy_s")
    )
    return [result("distributed/overlap/epoch_s_over_rollout_plus_update", epoch, "s", work, "<= 1.10")]


def weight_sync(repeats: int) -> list[Result]:
    """Publish-to-all-workers latency: ray.put once + every worker loads into preallocated weights."""
    import ray
    from diffusers import UNet2DConditionModel

    from scoreaction.distributed.actors import from_numpy, to_numpy
    from scoreaction.models.presets import SD15_UNET_CONFIG

    @ray.remote(num_cpus=0)
    class Holder:
        def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
            self.weights = {k: torch.zeros(s) for k, s in shapes.items()}

        def load(self, box: list) -> float:
            t0 = time.perf_counter()
            state = from_numpy(ray.get(box[0]))
            with torch.no_grad():
                for k, v in state.items():
                    self.weights[k].copy_(v)
            return time.perf_counter() - t0

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    lora: dict[str, tuple[int, ...]] = {}
    for name, module in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            lora[f"{name}.lora_A.weight"] = (4, module.in_features)
            lora[f"{name}.lora_B.weight"] = (module.out_features, 4)
    full = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    out = []
    for label, shapes, workers in (("sd15_lora_r4", lora, 2), ("sd15_full_unet", full, 1)):
        holders = [Holder.remote(shapes) for _ in range(workers)]
        state = {k: torch.randn(s) for k, s in shapes.items()}
        mb = sum(math.prod(s) for s in shapes.values()) * 4 / 2**20
        times = []
        for _ in range(max(2, repeats) if label.endswith("lora_r4") else 2):
            t0 = time.perf_counter()
            ref = ray.put(to_numpy(state))
            ray.get([h.load.remote([ref]) for h in holders])
            times.append(time.perf_counter() - t0)
            del ref
        del state
        for h in holders:
            ray.kill(h)
        value = statistics.median(times[1:])
        print(
            f"[distributed] weight sync {label}: {mb:.1f} MB to {workers} worker(s) in {value:.3f} s",
            file=sys.stderr,
        )
        out.append(
            result(
                f"distributed/weight_sync/{label}_{mb:.0f}MB_to_{workers}_workers",
                value,
                "s",
                float("nan"),
                "report",
            )
        )
    return out


def scaling(repeats: int) -> list[Result]:
    """Rollout throughput (trajectories/s of the rollout phase) with 2 rollout workers over 1."""
    tps = {}
    for n in (1, 2):
        cfg = _cfg("tiny", repeats, f"resources.num_rollout_workers={n}", "sampler.batch_size=16")
        epochs = _distributed_epochs(cfg, threads=max(1, CPUS // n))
        tps[n] = cfg.run.num_samples / _median(epochs, "perf/rollout_s")
        _print_breakdown(f"{n} rollout worker(s)", epochs)
    return [
        result("distributed/scaling/rollout_traj_per_s_2_workers_over_1", tps[2], "traj/s", tps[1], "report")
    ]


def run(repeats: int) -> list[Result]:
    import ray

    started = not ray.is_initialized()
    if started:
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=max(CPUS, 4), include_dashboard=False, logging_level="ERROR")
    try:
        return overhead(repeats) + overlap(repeats) + weight_sync(repeats) + scaling(repeats)
    finally:
        if started:
            ray.shutdown()
