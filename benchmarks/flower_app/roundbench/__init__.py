"""Flower 1.42 apps for schoolfl's round-overhead benchmark (benchmarks/bench_round_overhead.py)."""
