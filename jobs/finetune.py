"""scoreaction's main job: fine-tune a diffusion model with CTRL (score as action) or DDPO.

    python jobs/finetune.py [--preset NAME] [--config FILE.yaml] [--set dotted.key=value ...] [--output-dir DIR]

Runs the loop in one process (rollout -> reward -> value update -> policy update per epoch; the Ray
actors and the Ray Train learner are the next step). Writes DIR/summary.json, DIR/reward_curve.png,
sample grids under DIR/samples/ (image presets) and checkpoints under DIR/checkpoints/.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoreaction.checkpoint import latest_checkpoint  # noqa: E402
from scoreaction.config import PRESETS, Config, ConfigError, build_config  # noqa: E402
from scoreaction.trainer import Trainer  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help=f"config preset: {', '.join(PRESETS)} (default: tiny)")
    p.add_argument("--config", default=None, help="YAML file merged over the preset")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, value parsed as YAML, e.g. --set sampler.num_steps=20 (repeatable)",
    )
    p.add_argument("--output-dir", default=None, help="run folder (default: run.output_dir)")
    return p.parse_args(argv)


def run_finetune(cfg: Config, out: Path) -> dict:
    """Fine-tune with a progress bar per epoch; returns the summary written to out/summary.json."""
    trainer = Trainer(cfg, out)
    bar = tqdm(total=cfg.run.epochs, desc=f"{cfg.algorithm.name} on {cfg.model.preset}", unit="epoch")

    def progress(m: dict) -> None:
        bar.set_postfix(reward=f"{m['rollout/reward_mean']:.4g}", kl=f"{m['rollout/kl_mean']:.3g}")
        bar.update(1)

    try:
        return trainer.fit(progress)
    finally:
        bar.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"run.output_dir={args.output_dir}")
        cfg = build_config(args.preset, args.config, overrides)
        out = Path(cfg.run.output_dir)
        if latest_checkpoint(out) is not None:
            raise ConfigError(
                f"--output-dir {str(out)!r} already holds a run's checkpoints ({latest_checkpoint(out)}); "
                "choose another folder (resuming a run is not implemented yet). Nothing was overwritten."
            )
        out.mkdir(parents=True, exist_ok=True)
        summary = run_finetune(cfg, out)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    final = summary["final"]
    print(
        f"{summary['algorithm']} on {summary['preset']}: {summary['epochs']} epochs, {summary['samples']} samples, "
        f"final reward {final['reward_mean']:.4g}, KL {final['kl_mean']:.3g}, objective {final['objective']:.4g}\n"
        f"run folder: {out} (summary.json, reward_curve.png, checkpoints/)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
