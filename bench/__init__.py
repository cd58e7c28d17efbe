"""Benchmarks: each `bench_*.py` module has `run(quick=False) -> list[dict]`; `python -m bench` prints them."""
