"""The learner on Ray Train: one long-lived ``TorchTrainer.fit()`` whose ranks each run the epoch loop
(``scoreaction.loop.EpochLoop``) with ``RayRollouts``.

What Ray adds to the loop, and only that, lives here: the rank and world size from the Ray Train context,
the gradient all-reduce hooks and the initial broadcast of the weights (``scoreaction.ddp``), Ray Train's
checkpoint registration (``ray.train.report``) and its checkpoint after a restart, and rank 0's events
travelling to the driver through the ``EventSink`` actor. On a restart (Ray Train FailureConfig, or
``--resume``) the loop starts from the newest complete checkpoint and re-runs the epochs after it: rollout
noise depends only on (seed, epoch, batch), so the re-run epochs are the ones that were lost, not new ones,
and the driver's reporter replaces their records.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ray
import ray.train

from scoreaction.config import Config
from scoreaction.ddp import GradientAllReduce, broadcast_tensors
from scoreaction.distributed.actors import set_threads
from scoreaction.distributed.rollouts import RayRollouts
from scoreaction.loop import EpochLoop, LearnerHooks
from scoreaction.nonfinite import NonFiniteError
from scoreaction.reporter import RunStopped
from scoreaction.run_folder import NonFiniteCheckpointError, clean_leftovers

logger = logging.getLogger(__name__)


class RayTrainHooks(LearnerHooks):
    """Registers every training checkpoint with Ray Train, and offers Ray Train's after a restart."""

    backend = "ray"

    def __init__(self, rank: int, checkpoint_dir: Path) -> None:
        self.rank, self.checkpoint_dir = rank, checkpoint_dir

    def resume_candidates(self) -> list[Path]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return []
        if self.rank == 0:
            clean_leftovers(self.checkpoint_dir)  # a restart: what the dead rank 0 was writing
        return [Path(ckpt.path)]

    def checkpoint_written(self, step: int, path: Path | None, metrics: dict[str, Any]) -> None:
        if path is None:
            ray.train.report({"epoch": step})
            return
        ray.train.report(
            {"epoch": step, **{k: v for k, v in metrics.items() if isinstance(v, float | int)}},
            checkpoint=ray.train.Checkpoint(str(path)),
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD,
        )


def train_loop(config: dict[str, Any]) -> None:
    """The Ray Train function (``TorchTrainer(train_loop, train_loop_config=...)``). Non-finite numbers stop
    the run (no Ray Train retry: it would hit them again) with the last good checkpoint in place; rank 0
    tells the driver, which raises the error again."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.model_validate(config["cfg"])
    set_threads(config.get("threads"))
    sink = config["sink"]
    checkpoint_dir = Path(config["checkpoint_dir"])
    loop = EpochLoop(
        cfg,
        checkpoint_dir,
        lambda loop: RayRollouts(
            cfg,
            loop.reward_fn,
            rank,
            world,
            config["rollout_workers"] if rank == 0 else None,
            config["reward_workers"] if rank == 0 else None,
        ),
        rank=rank,
        world=world,
        run_id=config.get("run_id"),
        faults=config.get("faults"),
        hooks=RayTrainHooks(rank, checkpoint_dir),
    )
    # every rank starts from rank 0's weights (a checkpoint, when restored, is the same on every rank)
    broadcast_tensors(loop.policy.trainable_parameters() + list(loop.value_fn.parameters()))
    grad_sync = [
        GradientAllReduce(loop.policy.trainable_parameters()),
        GradientAllReduce(list(loop.value_fn.parameters())),
    ]
    try:
        loop.run(report=lambda event: sink.push.remote(event))
    except (NonFiniteError, NonFiniteCheckpointError) as exc:
        logger.error("rank %d: %s", rank, exc)
        if rank == 0:
            stopped = RunStopped(
                str(exc),
                getattr(exc, "kind", "checkpoint"),
                getattr(exc, "epoch", None),
                getattr(exc, "count", 0),
                getattr(exc, "total", 0),
            )
            ray.get(sink.push.remote(stopped))
    finally:
        for s in grad_sync:
            s.remove()
        loop.rollouts.close()
