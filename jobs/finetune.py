"""scoreaction's main job.

    python jobs/finetune.py [--preset NAME] [--config FILE.yaml] [--set dotted.key=value ...] [--output-dir DIR]

Status: the fine-tuning loop (CTRL / DDPO) and its Ray actors land with the next issues. Until then this
job runs the sampling demo on the chosen preset: it loads the model through the real loading path,
attaches the LoRA policy, samples ``run.num_samples`` trajectories with exact per-step log-probabilities,
checks the on-policy ratio, and writes a sample grid, a step-0 checkpoint and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scoreaction.checkpoint import latest_checkpoint, save_run_checkpoint  # noqa: E402
from scoreaction.config import PRESETS, Config, ConfigError, build_config  # noqa: E402
from scoreaction.images import save_grid  # noqa: E402
from scoreaction.policy import DiffusionPolicy  # noqa: E402
from scoreaction.sampling import Trajectory, evaluate_log_probs, sample_trajectories  # noqa: E402


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
    p.add_argument("--resume", action="store_true", help="allow an output dir that already holds checkpoints")
    return p.parse_args(argv)


def run_sampling_demo(cfg: Config, out: Path) -> dict:
    """Sample, verify the on-policy ratio, write grid + checkpoint + summary. Returns the summary."""
    start = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    policy = DiffusionPolicy.from_config(cfg.model, cfg.policy)
    load_s = time.perf_counter() - start
    generator = torch.Generator(device=policy.device).manual_seed(cfg.run.seed)
    prompts = [cfg.run.prompts[i % len(cfg.run.prompts)] for i in range(cfg.run.num_samples)]
    batches: list[Trajectory] = []
    t0 = time.perf_counter()
    bs = cfg.sampler.batch_size
    for i in tqdm(range(0, len(prompts), bs), desc="sampling", unit="batch"):
        batches.append(sample_trajectories(policy, prompts[i : i + bs], cfg.sampler, generator).to("cpu"))
    sample_s = time.perf_counter() - t0
    traj = Trajectory.cat(batches)
    # Re-evaluate the first batch with unchanged parameters: the importance ratio must be exactly 1.
    first = batches[0].to(policy.device)
    ratio_max = float((evaluate_log_probs(policy, first) - first.log_probs).abs().max())

    grid = save_grid(traj.images, out / "samples" / "grid_step000000.png")
    ckpt = save_run_checkpoint(policy, out, step=0, config=cfg.model_dump())
    summary = {
        "mode": "sampling-demo",
        "note": "fine-tuning (CTRL/DDPO) is not implemented yet; this run samples and checkpoints the initial policy",
        "preset": cfg.model.preset,
        "num_samples": len(traj.prompts),
        "num_steps": traj.num_steps,
        "stepper": traj.stepper,
        "log_prob_mean_per_step": traj.log_probs.mean(0).tolist(),
        "on_policy_max_abs_log_ratio": ratio_max,
        "load_s": load_s,
        "sample_s": sample_s,
        "trajectories_per_s": len(traj.prompts) / sample_s,
        "wall_s": time.perf_counter() - start,
        "grid": str(grid),
        "checkpoint": str(ckpt),
        "config": cfg.model_dump(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        overrides = list(args.overrides)
        if args.output_dir:
            overrides.append(f"run.output_dir={args.output_dir}")
        cfg = build_config(args.preset, args.config, overrides)
        out = Path(cfg.run.output_dir)
        if latest_checkpoint(out) is not None and not args.resume:
            raise ConfigError(
                f"--output-dir {str(out)!r} already holds a run's checkpoints ({latest_checkpoint(out)}); "
                "pass --resume to continue it or choose another folder. Nothing was overwritten."
            )
        out.mkdir(parents=True, exist_ok=True)
        summary = run_sampling_demo(cfg, out)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"sampled {summary['num_samples']} trajectories x {summary['num_steps']} steps "
        f"({summary['trajectories_per_s']:.2f} traj/s); on-policy |log-ratio| max {summary['on_policy_max_abs_log_ratio']:.1e}\n"
        f"grid: {summary['grid']}\ncheckpoint: {summary['checkpoint']}\nsummary: {out / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
