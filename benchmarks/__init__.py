"""Benchmarks B1–B8 of docs/BENCH.md: ``python -m benchmarks [b1 … b8]``."""
