"""The in-process backend: the epoch loop (``scoreaction.loop``) with one learner and ``LocalRollouts``, in
this process, without Ray (``jobs/finetune.py --single-process``).

It writes what a Ray run writes (summary.json, reward_curve.png, TensorBoard scalars, sample grids, training
checkpoints with one ``latest``) through the same reporter and checkpoint code, and ``fit(resume=True)``
continues a run from its newest complete checkpoint exactly as if it had not stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scoreaction.config import Config
from scoreaction.faults import FaultPlan
from scoreaction.loop import EpochLoop
from scoreaction.reporter import EpochDone, Event, RunReporter
from scoreaction.rewards import RewardFn, build_monitors
from scoreaction.rollouts import LocalRollouts
from scoreaction.run_folder import checkpoint_dir_for, open_run


class Trainer(EpochLoop):
    """One run in this process: ``fit()`` owns the run folder, runs the epochs and writes the summary."""

    def __init__(
        self,
        cfg: Config,
        output_dir: str | Path | None = None,
        *,
        faults: FaultPlan | None = None,
        reward_factory: Callable[[Config], RewardFn] | None = None,
    ) -> None:
        self.out = Path(output_dir or cfg.run.output_dir).expanduser().resolve()
        super().__init__(
            cfg,
            checkpoint_dir_for(cfg, self.out),
            lambda loop: LocalRollouts(cfg, loop.policy, loop.reward_fn, build_monitors(cfg.reward), faults),
            faults=faults,
            reward_factory=reward_factory,
        )

    def fit(
        self,
        progress: Callable[[dict[str, Any]], None] | None = None,
        resume: bool = False,
        progress_bar: bool = False,
    ) -> dict[str, Any]:
        """Run the epochs (after the checkpoint's, with resume=True) and write summary.json; returns it.

        Owns the run folder while it runs: a second job on it is refused, and a folder that already holds a
        run's checkpoints is refused unless resume=True. progress(metrics): called after every epoch."""
        start = time.perf_counter()
        folder = open_run(self.cfg, self.out, resume)
        self.run_id = folder.run_id
        reporter = RunReporter(self.cfg, self.out, progress_bar=progress_bar)

        def report(event: Event) -> None:
            reporter.handle(event)
            if progress is not None and isinstance(event, EpochDone):
                progress(event.metrics)

        try:
            self.run(report)
        finally:
            reporter.close()
            folder.close()
        return reporter.write_summary(
            time.perf_counter() - start,
            {"backend": "in-process"},
        )
