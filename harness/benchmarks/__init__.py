"""Benchmarks, kept apart from the code they measure: training-step throughput (``bench.py speed``),
fine-tuning throughput over ranks (``bench.py finetune-bench``), a 1,000-run report read from MLflow
(``bench.py report-bench``) and the calibration of the report's verdicts by simulation
(``bench.py calibrate``)."""
