"""Benchmarks, kept apart from the code they measure: training-step throughput (``bench.py speed``)
and a 1,000-run report read from MLflow (``bench.py report-bench``)."""
