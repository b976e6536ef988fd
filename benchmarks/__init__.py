"""Benchmarks: ``python -m benchmarks.throughput`` (speed and memory against peers, one process)."""
