"""Shared helpers of the benchmark suites: timing and the result record."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# One measured number: {"name", "value", "unit", "baseline", "ratio", "target"}; the baseline is measured in
# the same run as the value, and ratio = value / baseline (or whatever the suite documents).
Result = dict


def interleaved_median(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
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


def result(
    name: str, value: float, unit: str, baseline: float, target: str, ratio: float | None = None
) -> Result:
    """A result record; ratio defaults to value / baseline."""
    if ratio is None:
        ratio = value / baseline if baseline else float("nan")
    return {
        "name": name,
        "value": round(value, 4),
        "unit": unit,
        "baseline": round(baseline, 4),
        "ratio": round(ratio, 4),
        "target": target,
    }
