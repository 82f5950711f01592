"""Benchmarks: the cache simulator and its trace generators."""
