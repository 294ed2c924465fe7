"""Benchmarks, kept apart from the code they measure: training-step throughput (``bench.py speed``)."""
