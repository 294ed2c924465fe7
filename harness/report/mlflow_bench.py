"""Benchmark: a report over 1,000 finished runs read from a real SQLite MLflow store.

``python -m harness.report.bench --mlflow`` (or ``bench.py report-bench``) fills a store with
the synthetic grid of :mod:`harness.report.bench` through the tracking API (one parent run,
a child run per cell x seed with the full flattened config as params, summary metrics and
100 loss points each), then times :func:`~harness.report.ingest.load_runs` and
:func:`~harness.report.build_report` on it and prints the seconds. Goal: under 5 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GRID = "synthetic"
GOAL_S = 5.0


@dataclass(frozen=True)
class BenchResult:
    n_runs: int
    n_points: int
    populate_s: float
    load_s: float
    build_s: float
    cpu_s: float = float("nan")  # CPU seconds of load + build, figure workers included
    load_avg: float = float("nan")  # 1-minute load average when it ended: other work slows it

    @property
    def total_s(self) -> float:
        return self.load_s + self.build_s


def populate(uri: str, runs: pd.DataFrame, curves: pd.DataFrame, grid: str = GRID, *,
             progress: bool = False) -> str:
    """Write the synthetic `runs`/`curves` frames to the store as a grid; returns the
    experiment id. Uses the same calls as the launcher and the jobs (plus one log_batch of
    metrics per run)."""
    from mlflow.entities import Metric, RunTag

    from harness.config import RunConfig
    from harness.report.bench import SYNTHETIC_AXES
    from harness.tracking import (cell_tags, client, create_cell_run, prepare_store, run_name,
                                  start_parent_run)

    experiment_id = prepare_store(uri, grid)
    axes = [{"name": name, "values": values, "baseline": values[0]} for name, values in SYNTHETIC_AXES.items()]
    parent = start_parent_run(uri, experiment_id, grid=grid, tags={"executor": "local"}, axes=axes)
    mlflow_client = client(uri)
    base = RunConfig()
    loss_by_run = {key: group for key, group in curves.groupby(["cell_id", "seed"], sort=False)}
    now = int(time.time() * 1000)
    summary = {"linear_top1": "linear_top1", "knn_top1": "knn_top1", "finetune_top1": "finetune_top1",
               "final_loss": "final_loss", "images_per_s": "images_per_s",
               "peak_memory_mb": "peak_memory_mb", "gpu_hours": "device_hours"}
    count, start = 0, time.perf_counter()
    for row in runs.to_dict("records"):
        values = {name: row[name] for name in SYNTHETIC_AXES}
        values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in values.items()}
        cfg = base.with_overrides({**values, "seed": int(row["seed"])})
        status = row["status"]
        reason = row["failure_reason"] if isinstance(row["failure_reason"], str) else ""
        tags = cell_tags(cfg, grid=grid, axis_values=values, executor="local", git_commit="synthetic",
                         extra={"status": status, "failure_reason": reason})
        run_id = create_cell_run(uri, experiment_id, parent_run_id=parent, run_name=run_name(values, cfg.seed),
                                 params=cfg.flat(), tags=tags)
        metrics = [Metric(key, float(row[col]), now, 0) for col, key in summary.items()
                   if not pd.isna(row[col])]
        points = loss_by_run.get((row["cell_id"], row["seed"]))
        if points is not None:
            metrics += [Metric("train/loss", float(v), now, int(s))
                        for s, v in zip(points["step"], points["loss"])]
        if metrics:
            mlflow_client.log_batch(run_id, metrics=metrics)
        if status in ("done", "failed"):
            mlflow_client.set_terminated(run_id, "FINISHED" if status == "done" else "FAILED")
        count += 1
        if progress and count % 100 == 0:
            print(f"  filled {count}/{len(runs)} runs ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr, flush=True)
    mlflow_client.log_batch(parent, tags=[RunTag("status", "done")])
    mlflow_client.set_terminated(parent, "FINISHED")
    return experiment_id


def run_benchmark(n_runs: int = 1000, n_steps: int = 100, store: Path | None = None,
                  out_dir: Path | None = None) -> BenchResult:
    """Populate a SQLite store (reused when ``store`` already holds the grid) and time a report."""
    from harness.report.bench import synthetic_runs
    from harness.report.build import build_report
    from harness.report.ingest import load_runs
    from harness.tracking import client, sqlite_uri

    # A fresh store is filled on tmpfs where there is one: filling is fsync-bound on disk
    # (8 commits a run) and not what is measured; reading hits the page cache either way.
    shm = Path("/dev/shm")
    tmp_parent = str(shm) if store is None and shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=tmp_parent) as tmp:
        db = Path(store) if store else Path(tmp) / "mlflow.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = sqlite_uri(db)
        start = time.perf_counter()
        existing = db.exists() and client(uri).get_experiment_by_name(GRID) is not None
        if not existing:
            runs, curves = synthetic_runs(n_runs, n_steps)
            populate(uri, runs, curves, progress=True)
        populate_s = time.perf_counter() - start

        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        runs, curves = load_runs(uri, GRID)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        build_report(runs, curves, Path(out_dir) if out_dir else Path(tmp) / "report")
        build_s = time.perf_counter() - start
        return BenchResult(len(runs), len(curves), populate_s if not existing else 0.0, load_s, build_s,
                           cpu_s=_cpu_seconds() - cpu_start, load_avg=os.getloadavg()[0])


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the figure workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlflow", action="store_true", help="(accepted for `python -m harness.report.bench --mlflow`)")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100, help="loss points per run")
    parser.add_argument("--store", type=Path, default=None,
                        help="SQLite file to fill (reused if it already holds the grid) [default: a temp file]")
    parser.add_argument("--out", type=Path, default=None, help="report folder [default: a temp folder]")
    args = parser.parse_args(argv)
    result = run_benchmark(args.runs, args.steps, args.store, args.out)
    print(report_lines(result))
    return result


def report_lines(result: BenchResult) -> str:
    verdict = "OK" if result.total_s < GOAL_S else "OVER"
    lines = []
    if result.populate_s:
        lines.append(f"filled a SQLite MLflow store with {result.n_runs} runs in {result.populate_s:.1f} s")
    lines.append(f"load_runs ({result.n_runs} runs, {result.n_points} loss points): {result.load_s:.2f} s")
    lines.append(f"build_report (all formats and figures): {result.build_s:.2f} s")
    lines.append(f"report from MLflow, total: {result.total_s:.2f} s (goal < {GOAL_S:.0f} s: {verdict}); "
                 f"{result.cpu_s:.2f} CPU-s, {os.cpu_count()} CPUs, load average {result.load_avg:.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
