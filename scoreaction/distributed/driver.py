"""The driver of a Ray run: checks the plan against the cluster, starts the actors and the Ray Train
learner, and hands the learner's events to the run's reporter (``scoreaction.reporter.RunReporter``: the
same progress bar, TensorBoard scalars, grids, summary and reward curve as the in-process backend).

Expects Ray to be initialised already (``jobs/finetune.py`` does that). The epoch loop itself runs in the
learner ranks (``learner_group``); the driver only starts things, watches, and cleans up.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from scoreaction.config import Config
from scoreaction.distributed.actors import EventSink, RewardWorker, RolloutWorker
from scoreaction.distributed.plan import (
    PlanError,
    build_plan,
    check_fit,
    learner_backend,
    nodes_from_ray,
    validate_layout,
)
from scoreaction.faults import FaultPlan, maybe_fail
from scoreaction.nonfinite import NonFiniteError
from scoreaction.reporter import EpochDone, Event, RunReporter, RunStopped
from scoreaction.run_folder import (
    NonFiniteCheckpointError,
    check_not_locked,
    check_resume,
    checkpoint_dir_for,
    latest_step_dir,
    open_run,
)

logger = logging.getLogger(__name__)

__all__ = ["check_run_dir", "checkpoint_dir_for", "one_host_threads", "preflight", "run_distributed"]


def check_run_dir(cfg: Config, checkpoint_dir: Path, resume: bool) -> Path | None:
    """Refuse to mix runs (scoreaction.run_folder.check_resume): without resume the folder must hold no
    checkpoint; with resume it must hold a training checkpoint of a run with the same settings; and no live
    job may own it. Reads only: nothing is created or changed."""
    check_not_locked(checkpoint_dir.parent)
    return check_resume(cfg, checkpoint_dir, resume)


def preflight(cfg: Config, out: Path, resume: bool, local_nodes: list | None = None) -> None:
    """Every check that needs no cluster, before anything is started or written: the learner layout, the
    run folder (check_run_dir) and, on a local Ray, whether the plan fits this machine (resources.require_fit).
    ``run_distributed`` checks the plan against the cluster it finds, once Ray is up."""
    validate_layout(cfg)
    check_run_dir(cfg, checkpoint_dir_for(cfg, out), resume)
    if local_nodes is not None and cfg.resources.require_fit:
        check_fit(build_plan(cfg), local_nodes)


def absolutize(cfg: Config) -> Config:
    """Relative local paths resolved against the driver's working directory (actors and Ray Train workers
    run elsewhere)."""
    cfg = cfg.model_copy(deep=True)
    p = cfg.model.name_or_path
    if p and Path(p).expanduser().exists():
        cfg.model.name_or_path = str(Path(p).expanduser().resolve())
    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser().resolve())
    return cfg


Threads = int | dict[str, int] | None
"""Torch threads per actor: one number for every actor, or {"rollout": n, "reward": n, "learner": n}."""


def _threads(threads: Threads, kind: str, torch_threads: int | None, cpus: float) -> int:
    if isinstance(threads, dict):
        threads = threads.get(kind)
    return threads or torch_threads or max(1, math.ceil(cpus))


def one_host_threads(cfg: Config, cores: int) -> dict[str, int]:
    """Torch threads per actor when every actor shares one host of `cores` cores (a local Ray): actors that
    run at the same time split the cores, since oversubscribed intra-op threads spin against each other.
    Rollout and reward actors overlap when an epoch has more rollout batches than rollout workers (each batch
    is scored while the next is sampled); otherwise the reward actors score after sampling ends and, like the
    learner workers (which run while the others wait for their weights), split every core."""
    r = cfg.resources
    batches = math.ceil(cfg.run.num_samples / cfg.sampler.batch_size)
    overlap = batches > r.num_rollout_workers
    rollout = max(1, cores // (r.num_rollout_workers + (r.num_reward_workers if overlap else 0)))
    return {
        "rollout": rollout,
        "reward": rollout if overlap else max(1, cores // r.num_reward_workers),
        "learner": max(1, cores // r.num_learner_workers),
    }


@dataclass
class ActorSet:
    """The run's actors: the event sink, the rollout workers and the reward workers (and where they run)."""

    sink: Any
    rollout: list = field(default_factory=list)
    reward: list = field(default_factory=list)
    info: dict[str, list[dict]] = field(default_factory=dict)

    def kill(self) -> None:
        for a in [*self.rollout, *self.reward, self.sink]:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass


def start_actors(
    cfg: Config,
    threads: Threads = None,
    faults: FaultPlan | None = None,
    reward_factory: Callable | None = None,
) -> ActorSet:
    """Create the sink, rollout and reward actors and wait until they are up (or fail clearly)."""
    r = cfg.resources
    cfg_dict = cfg.model_dump()
    strategy = "SPREAD" if r.placement == "spread" else "DEFAULT"
    common = {
        "max_restarts": r.max_restarts,
        "max_task_retries": r.max_restarts,
        "scheduling_strategy": strategy,
    }
    # The sink lives on the driver's node (the head under `ray job submit`): the driver reads it, and a worker
    # node lost mid-run must not take the run's metrics with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actors = ActorSet(sink=ray.remote(EventSink).options(num_cpus=0, scheduling_strategy=here).remote())
    rollout_cls = ray.remote(RolloutWorker).options(
        num_cpus=r.rollout_cpus, num_gpus=r.rollout_gpus, resources=r.rollout_resources or None, **common
    )
    reward_cls = ray.remote(RewardWorker).options(
        num_cpus=r.reward_cpus, num_gpus=r.reward_gpus, resources=r.reward_resources or None, **common
    )
    actors.rollout = [
        rollout_cls.remote(cfg_dict, i, _threads(threads, "rollout", r.torch_threads, r.rollout_cpus), faults)
        for i in range(r.num_rollout_workers)
    ]
    actors.reward = [
        reward_cls.remote(
            cfg_dict, i, _threads(threads, "reward", r.torch_threads, r.reward_cpus), faults, reward_factory
        )
        for i in range(r.num_reward_workers)
    ]
    try:
        info = ray.get([a.ready.remote() for a in actors.rollout + actors.reward], timeout=r.start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        actors.kill()
        raise PlanError(
            f"the rollout/reward actors did not start within resources.start_timeout_s={r.start_timeout_s:g} s: "
            "the cluster has not got the resources free (other jobs?) or cannot start the workers; "
            "`ray status` shows pending demands"
        ) from None
    except ray.exceptions.RayActorError as exc:
        actors.kill()
        raise RuntimeError(f"an actor failed to start: {exc}") from exc
    actors.info = {"rollout": info[: len(actors.rollout)], "reward": info[len(actors.rollout) :]}
    return actors


def make_trainer(
    cfg: Config,
    actors: ActorSet,
    checkpoint_dir: Path,
    threads: Threads,
    faults: FaultPlan | None,
    run_id: str | None = None,
):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from scoreaction.distributed.learner_group import train_loop

    r = cfg.resources
    per_worker = {"CPU": r.learner_cpus, **r.learner_resources}
    if r.learner_gpus > 0:
        per_worker["GPU"] = r.learner_gpus
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "rollout_workers": actors.rollout,
            "reward_workers": actors.reward,
            "sink": actors.sink,
            "checkpoint_dir": str(checkpoint_dir),
            "threads": _threads(threads, "learner", r.torch_threads, r.learner_cpus),
            "faults": faults,
            "run_id": run_id,
        },
        torch_config=TorchConfig(backend=learner_backend(cfg)),
        scaling_config=ScalingConfig(
            num_workers=r.num_learner_workers, use_gpu=r.learner_gpus > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=checkpoint_dir.name,
            storage_path=str(checkpoint_dir.parent),
            failure_config=FailureConfig(max_failures=r.max_learner_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


@dataclass
class ActorsStarted:
    """The rollout and reward actors are up; info: {"rollout": [...], "reward": [...]} of their ready()
    (pid, node_id, ...). Given to on_event only (the reporter does not need it)."""

    info: dict[str, list[dict]]


class EventPump(threading.Thread):
    """Hands the learner's events to the reporter (and to on_event) every half second while fit() runs."""

    def __init__(
        self,
        sink,
        reporter: RunReporter,
        on_event: Callable[[Event], None] | None,
        faults: FaultPlan | None = None,
    ) -> None:
        super().__init__(daemon=True)
        self.sink, self.reporter, self.on_event, self.faults = sink, reporter, on_event, faults
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.stopped: RunStopped | None = None

    def drain(self) -> None:
        for event in ray.get(self.sink.drain.remote()):
            if isinstance(event, RunStopped):  # the learner stopped the run on purpose (non-finite numbers)
                self.stopped = event
                continue
            self.reporter.handle(event)
            if self.on_event is not None:
                self.on_event(event)
            if isinstance(event, EpochDone):  # kill -9 of the driver mid-run (fault drills)
                maybe_fail(self.faults, "driver", int(event.metrics["epoch"]), 0)

    def run(self) -> None:
        try:
            while not self.stop.wait(0.5):
                self.drain()
        except BaseException as exc:  # reported after fit()
            self.error = exc


def run_distributed(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    threads: Threads = None,
    faults: FaultPlan | None = None,
    reward_factory: Callable | None = None,
    on_event: Callable[[Event | ActorsStarted], None] | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Run the whole fine-tuning on the connected Ray cluster; returns the summary (also in summary.json).

    threads: torch threads per actor, one number or per kind (``one_host_threads``); None, or a kind left
    out: resources.torch_threads, else the CPUs the actor reserves.
    faults: kill processes on purpose (tests, drills). reward_factory: cfg -> reward fn, instead of
    build_reward (benchmarks). on_event(event): called with every learner event after the reporter (tests).
    """
    t_start = time.perf_counter()
    cfg = absolutize(cfg)
    out = Path(cfg.run.output_dir if out is None else out).resolve()
    faults = faults if faults is not None else FaultPlan.from_env()
    validate_layout(cfg)
    folder = open_run(cfg, out, resume)  # owns the run folder until the run ends (or refuses it)
    try:
        return _run_owned(cfg, out, folder, t_start, threads, faults, reward_factory, on_event, progress_bar)
    finally:
        folder.close()


def _run_owned(cfg, out, folder, t_start, threads, faults, reward_factory, on_event, progress_bar):
    checkpoint_dir = folder.checkpoint_dir
    plan = build_plan(cfg)
    nodes = nodes_from_ray(ray.nodes())
    if cfg.resources.require_fit:
        check_fit(plan, nodes)
    if len(nodes) > 1 and not cfg.run.storage_path:
        logger.warning(
            "%d nodes and run.storage_path is not set: checkpoints go to %s on the learner's node; set "
            "run.storage_path to storage every node mounts",
            len(nodes),
            checkpoint_dir,
        )
    out.mkdir(parents=True, exist_ok=True)
    actors = start_actors(cfg, threads, faults, reward_factory)
    if on_event is not None:
        on_event(ActorsStarted(actors.info))
    reporter = RunReporter(cfg, out, progress_bar=progress_bar)
    pump = EventPump(actors.sink, reporter, on_event, faults)
    pump.start()
    try:
        result = make_trainer(cfg, actors, checkpoint_dir, threads, faults, folder.run_id).fit()
    finally:
        pump.stop.set()
        pump.join()
        try:
            pump.drain()
        finally:
            reporter.close()
            actors.kill()
    if pump.error is not None:
        raise pump.error
    if pump.stopped is not None:
        f = pump.stopped
        if f.kind == "checkpoint":
            raise NonFiniteCheckpointError(f.message)
        raise NonFiniteError(f.message, kind=f.kind, epoch=f.epoch, count=f.count, total=f.total)
    final_ckpt = latest_step_dir(checkpoint_dir)
    backend = {
        "backend": "ray",
        "checkpoint_dir": str(checkpoint_dir),
        "distributed": {
            "learner_starts_at_epoch": reporter.learner_starts,
            "redone_epochs": reporter.redone_epochs,
            "checkpoint": str(final_ckpt) if final_ckpt else None,
            "ray_train_checkpoint": getattr(result.checkpoint, "path", None),
            "placement": {k: [i["node_id"] for i in v] for k, v in actors.info.items()},
            "resources": cfg.resources.model_dump(),
        },
    }
    return reporter.write_summary(time.perf_counter() - t_start, backend)
