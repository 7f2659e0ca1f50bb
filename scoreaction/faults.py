"""Fault injection for tests and drills: kill a rollout, reward or learner process, the driver, or a
checkpoint save once, mid-epoch; or have a reward return NaN once.

A fault fires at most once per run: the first process that reaches it creates a marker file (O_EXCL) in
``marker_dir`` and then SIGKILLs itself, exactly as ``kill -9`` would (``nan_reward``: the reward worker
returns NaN scores for that batch instead). The restarted process finds the marker and carries on. The
marker directory must be visible to the process (one host, or shared storage).

Kinds: ``rollout`` / ``reward`` (index: the actor), ``learner`` (index: the rank; after the rollouts, before
the update), ``save`` (learner rank 0 while writing the epoch's checkpoint, before it is renamed into place;
epoch: the checkpoint's step), ``driver`` (the driver process, once it has reported that epoch),
``nan_reward`` (reward actor `index` scores the epoch's batches as NaN).

A job started from the command line (``jobs/finetune.py``) reads a plan from the environment:
``SCOREACTION_FAULTS="driver:3,rollout:1:1"`` (kind:epoch[:index], comma separated) and
``SCOREACTION_FAULT_MARKERS=/dir``.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

FaultKind = Literal["rollout", "reward", "learner", "save", "driver", "nan_reward"]
FAULT_KINDS = ("rollout", "reward", "learner", "save", "driver", "nan_reward")
ENV_FAULTS = "SCOREACTION_FAULTS"
ENV_MARKERS = "SCOREACTION_FAULT_MARKERS"


@dataclass(frozen=True)
class Fault:
    """Fire the fault of kind `kind` in the process with index/rank `index` when it works on epoch `epoch`."""

    kind: FaultKind
    epoch: int
    index: int = 0


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...]
    marker_dir: str

    @classmethod
    def from_env(cls, env: dict | None = None) -> FaultPlan | None:
        """The plan in SCOREACTION_FAULTS / SCOREACTION_FAULT_MARKERS, or None when unset."""
        env = os.environ if env is None else env
        text = env.get(ENV_FAULTS, "").strip()
        if not text:
            return None
        markers = env.get(ENV_MARKERS)
        if not markers:
            raise ValueError(
                f"{ENV_FAULTS}={text!r} needs {ENV_MARKERS} (a folder for the once-only markers)"
            )
        faults = []
        for item in text.split(","):
            parts = item.strip().split(":")
            if len(parts) not in (2, 3) or parts[0] not in FAULT_KINDS:
                raise ValueError(
                    f"{ENV_FAULTS}: {item!r} is not kind:epoch[:index] with kind one of {', '.join(FAULT_KINDS)}"
                )
            faults.append(Fault(parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 0))
        Path(markers).mkdir(parents=True, exist_ok=True)
        return cls(tuple(faults), markers)

    def fires(self, kind: str, epoch: int, index: int) -> bool:
        """True the first time (over every process of the run) a planned fault is reached."""
        for f in self.faults:
            if (f.kind, f.epoch, f.index) != (kind, epoch, index):
                continue
            marker = Path(self.marker_dir) / f"{kind}-e{epoch}-i{index}"
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return True
        return False

    def maybe_fail(self, kind: str, epoch: int, index: int) -> None:
        if self.fires(kind, epoch, index):
            logger.warning(
                "fault injection: killing %s %d (pid %d) at epoch %d", kind, index, os.getpid(), epoch
            )
            os.kill(os.getpid(), signal.SIGKILL)

    def fired(self) -> list[str]:
        return sorted(p.name for p in Path(self.marker_dir).iterdir())


def maybe_fail(plan: FaultPlan | None, kind: str, epoch: int, index: int) -> None:
    if plan is not None:
        plan.maybe_fail(kind, epoch, index)


def fires(plan: FaultPlan | None, kind: str, epoch: int, index: int) -> bool:
    return plan is not None and plan.fires(kind, epoch, index)
