"""Benchmark suites (pytest-benchmark) and the report renderer; run with ``python -m benchmarks``."""
