"""Fault injection for tests and drills: kill a rollout, reward or learner process once, mid-epoch.

A fault fires at most once per run: the first process that reaches it creates a marker file (O_EXCL) in
``marker_dir`` and then SIGKILLs itself, exactly as ``kill -9`` would. The restarted process finds the
marker and carries on. The marker directory must be visible to the process (one host, or shared storage).
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

FaultKind = Literal["rollout", "reward", "learner"]


@dataclass(frozen=True)
class Fault:
    """Kill the process of kind `kind` with index/rank `index` when it works on epoch `epoch`."""

    kind: FaultKind
    epoch: int
    index: int = 0


@dataclass(frozen=True)
class FaultPlan:
    faults: tuple[Fault, ...]
    marker_dir: str

    def maybe_fail(self, kind: str, epoch: int, index: int) -> None:
        for f in self.faults:
            if (f.kind, f.epoch, f.index) != (kind, epoch, index):
                continue
            marker = Path(self.marker_dir) / f"{kind}-e{epoch}-i{index}"
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            logger.warning(
                "fault injection: killing %s %d (pid %d) at epoch %d", kind, index, os.getpid(), epoch
            )
            os.kill(os.getpid(), signal.SIGKILL)

    def fired(self) -> list[str]:
        return sorted(p.name for p in Path(self.marker_dir).iterdir())


def maybe_fail(plan: FaultPlan | None, kind: str, epoch: int, index: int) -> None:
    if plan is not None:
        plan.maybe_fail(kind, epoch, index)
