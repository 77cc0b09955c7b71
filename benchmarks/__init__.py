"""Benchmarks B1–B6 of BENCH.md: ``python -m benchmarks [b1 b2 b3 b4 b5 b6]``."""
