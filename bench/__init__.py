"""Benchmarks (pytest-benchmark); run with ``pytest bench --benchmark-only``."""
