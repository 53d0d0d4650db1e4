"""Benchmarks of DNA Messenger against raw baselines (conventions: shared BENCH.md)."""
