"""Benchmarks: every number is measured in this run against a baseline measured in the same run.

    python jobs/benchmark.py [SUITE ...] [--out FILE] [--repeats N]

Suites: one per module in jobs/bench/ (sampler, learner, algorithms, ...). Prints a table;
with --out writes a JSON list of
{"name", "value", "unit", "baseline", "ratio", "target"}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.common import Result  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent / "bench"
# Every module in jobs/bench/ except common is a suite named after its file.
SUITES: list[str] = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.stem not in ("__init__", "common"))


def run_suite(name: str, repeats: int) -> list[Result]:
    return importlib.import_module(f"bench.{name}").run(repeats)


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
        results += run_suite(name, args.repeats)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
