"""Benchmark suites of jobs/benchmark.py: one module per suite, each with ``run(repeats) -> list[Result]``."""
