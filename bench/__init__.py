"""Benchmarks: gate decision time, router overhead and throughput, scaling, and peers. Run ``python -m bench``."""
