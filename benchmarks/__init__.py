"""Workloads, sweeps and speed benchmarks."""
