"""Evaluate a tuned checkpoint at several step counts.

    python jobs/evaluate.py --checkpoint DIR [--num-samples N] [--num-steps 10,20,40] [--output-dir OUT]

DIR is a checkpoint folder (…/checkpoints/step_000008) or a run folder (its latest checkpoint). For each step
count: reward mean/std, KL to the reference and the objective E[r] - kl_coef KL, printed as a table and
written to OUT/evaluation.json; a sample grid OUT/grid_<steps>.png for image presets, and for toy-gmm the
samples themselves as OUT/samples_<steps>.npy (shape (N, d)) to check against the analytic optimum.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoreaction.checkpoint import CheckpointError  # noqa: E402
from scoreaction.config import ConfigError  # noqa: E402
from scoreaction.evaluation import evaluate_checkpoint, resolve_checkpoint  # noqa: E402


def _steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--num-steps={text!r} must be comma-separated integers such as 10,20,40"
        ) from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or run folder")
    p.add_argument("--num-samples", type=int, default=64, help="samples per step count (default 64)")
    p.add_argument("--num-steps", type=_steps, default=[10, 20, 40], help="step counts (default 10,20,40)")
    p.add_argument("--output-dir", default=None, help="where results go (default: RUN/eval/step_N)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--device", default=None, help="torch device (default: the run's model.device)")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        # checkpoints live at RUN/checkpoints/step_N: results go to RUN/eval/step_N, never into the checkpoint
        out = Path(args.output_dir) if args.output_dir else ckpt.parent.parent / "eval" / ckpt.name
        report = evaluate_checkpoint(
            args.checkpoint, args.num_samples, args.num_steps, out, args.seed, args.device
        )
    except (CheckpointError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    print(f"{report['preset']} checkpoint {report['checkpoint']} (step {report['step']})")
    print(f"{'steps':>6} {'reward_mean':>12} {'reward_std':>11} {'kl_mean':>9} {'objective':>10}")
    for r in report["results"]:
        print(
            f"{r['num_steps']:>6} {r['reward_mean']:>12.4g} {r['reward_std']:>11.4g} "
            f"{r['kl_mean']:>9.4g} {r['objective']:>10.4g}"
        )
    print(f"results: {out / 'evaluation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
