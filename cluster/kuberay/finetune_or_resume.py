"""The RayJob's entrypoint: `python jobs/finetune.py ARGS`, plus `--resume` when the run already has checkpoints.

    python cluster/kuberay/finetune_or_resume.py --preset sd15 --config cluster/configs/sd15-lora.yaml \
        --output-dir /shared/runs/sd15-lora

KubeRay retries a failed RayJob (spec.backoffLimit) by creating a new Ray cluster and submitting the same
entrypoint again. A fixed `--resume` would fail the first attempt (jobs/finetune.py refuses to resume a folder
with no checkpoint), and no `--resume` would fail every retry (it refuses to overwrite a run's checkpoints). So
this decides per attempt, with the check jobs/finetune.py itself makes before it starts
(scoreaction.distributed.driver.check_run_dir): when that check would refuse a fresh start because the run's
checkpoint folder (run.storage_path/<run>/checkpoints, or <output-dir>/checkpoints) holds a checkpoint, the
attempt resumes from it; otherwise it starts the run. Everything else, errors included, is jobs/finetune.py's:
a checkpoint that cannot be resumed (another config, no learner state) fails with its message instead of
being overwritten.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jobs.finetune as finetune  # noqa: E402
from scoreaction.config import build_config  # noqa: E402
from scoreaction.distributed.driver import check_run_dir, checkpoint_dir_for  # noqa: E402

log = logging.getLogger("finetune_or_resume")


def refusal_to_start(argv: list[str]) -> str | None:
    """Why jobs/finetune.py ARGV (without --resume) would refuse to start: the run's checkpoint folder already
    holds a checkpoint. None when it would start. The same check jobs/finetune.py makes (check_run_dir)."""
    args = finetune.parse_args(argv)
    # as jobs/finetune.py builds it: --output-dir taken literally, not parsed as YAML
    cfg = build_config(
        args.preset,
        args.config,
        args.overrides,
        {"run.output_dir": args.output_dir} if args.output_dir else None,
    )
    checkpoint_dir = checkpoint_dir_for(cfg, Path(cfg.run.output_dir).expanduser().resolve())
    try:
        check_run_dir(cfg, checkpoint_dir, resume=False)
    except finetune.ResumeError as exc:
        return str(exc)
    return None


def with_resume(argv: list[str]) -> list[str]:
    """argv, with --resume added when the run folder already holds a checkpoint (and the job would train)."""
    args = finetune.parse_args(argv)
    if args.resume or args.dry_run or args.single_process:
        return list(argv)
    try:
        refusal = refusal_to_start(argv)
    except Exception:  # a bad config: jobs/finetune.py reports it with its own message and exit code
        return list(argv)
    if refusal is None:
        log.info("no checkpoint yet: starting the run")
        return list(argv)
    log.info("the run has checkpoints (%s): resuming (--resume)", refusal)
    return [*argv, "--resume"]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return finetune.main(with_resume(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
