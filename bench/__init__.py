"""The benchmark: `python -m bench` (or `python bench/bench.py`); BENCHMARKS.md and benchmarks.json hold its report."""
