"""Benchmarks, run on demand: ``python -m tests.benchmarks.bench`` (see bench.py)."""
