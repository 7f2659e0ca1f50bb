"""Benchmarks: every number is measured in this run against a baseline measured in the same run.

    python jobs/benchmark.py [SUITE ...] [--out FILE] [--repeats N]

Suites: sampler. Prints a table; with --out writes a JSON list of
{"name", "value", "unit", "baseline", "ratio", "target"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scoreaction.config import ModelConfig, SamplerConfig  # noqa: E402
from scoreaction.policy import DiffusionPolicy  # noqa: E402
from scoreaction.sampling import sample_trajectories  # noqa: E402

Result = dict


def _interleaved_median(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each fn, run round-robin (after one warm-up each) so drift hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_sampler(repeats: int) -> list[Result]:
    """Trajectories/s of sample_trajectories (every latent + log-probs recorded) over diffusers'
    StableDiffusionPipeline(output_type="latent") with DDIMScheduler eta=1: same UNet object (LoRA attached),
    steps, batch, guidance and seed. Neither decodes: this isolates the sampler's own overhead."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    policy = DiffusionPolicy.from_config(ModelConfig(preset="tiny"))
    pipe = StableDiffusionPipeline(
        vae=policy.vae,
        text_encoder=policy.text_encoder,
        tokenizer=policy.tokenizer,
        unet=policy.unet,
        scheduler=DDIMScheduler.from_config(policy.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    results = []
    cases = [
        ("tiny_8x8latent", dict(batch=8, steps=50, height=None, width=None)),
        ("tiny_arch_64x64latent", dict(batch=2, steps=6, height=512, width=512)),
    ]
    for label, c in cases:
        prompts = ["a photo of a cat"] * c["batch"]
        sampler = SamplerConfig(
            num_steps=c["steps"], guidance_scale=7.5, eta=1.0, height=c["height"], width=c["width"]
        )

        def ours(prompts=prompts, sampler=sampler):
            sample_trajectories(policy, prompts, sampler, torch.Generator().manual_seed(0), decode=False)

        def theirs(prompts=prompts, c=c):
            pipe(
                prompts,
                num_inference_steps=c["steps"],
                guidance_scale=7.5,
                eta=1.0,
                output_type="latent",
                height=c["height"],
                width=c["width"],
                generator=torch.Generator().manual_seed(0),
            )

        med = _interleaved_median({"ours": ours, "diffusers": theirs}, repeats)
        ours_tps, base_tps = c["batch"] / med["ours"], c["batch"] / med["diffusers"]
        results.append(
            {
                "name": f"sampler/{label}/b{c['batch']}_n{c['steps']}/trajectories_per_s",
                "value": round(ours_tps, 4),
                "unit": "traj/s",
                "baseline": round(base_tps, 4),
                "ratio": round(ours_tps / base_tps, 4),
                "target": ">= 0.95",
            }
        )
    return results


SUITES: dict[str, Callable[[int], list[Result]]] = {"sampler": bench_sampler}


def print_table(results: list[Result]) -> None:
    head = f"{'name':64} {'value':>12} {'unit':>8} {'baseline':>12} {'ratio':>8} {'target':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['name']:64} {r['value']:>12} {r['unit']:>8} {r['baseline']:>12} {r['ratio']:>8} {r['target']:>8}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "suites", nargs="*", default=list(SUITES), help=f"suites to run: {', '.join(SUITES)} (default: all)"
    )
    p.add_argument("--out", default=None, help="write the results as a JSON list to this file")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed repetitions per measurement (median is reported)"
    )
    args = p.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        print(f"error: unknown suite(s) {unknown}; allowed: {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print(f"error: --repeats={args.repeats} must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    results: list[Result] = []
    for name in args.suites:
        results += SUITES[name](args.repeats)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
