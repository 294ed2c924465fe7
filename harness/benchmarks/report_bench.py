"""Benchmark: a report over 1,000 runs read from a real MLflow store (``bench.py report-bench``).

:func:`synthetic_runs` makes realistic ``runs``/``curves`` frames (MILAN-like effects, seed
noise, failed and unfinished runs). :func:`populate` writes them as a grid the way ``ablate``
and the jobs do: one parent run, a pending cell run per cell x seed (the full flattened config as
params, the ``run_dir`` tag), then each started run's folder (``status.json``, ``metrics.jsonl``,
``results.json``) mirrored into its run by :func:`harness.tracking.sync_run`.
:func:`run_benchmark` times :mod:`harness.tracking.read` (the runs through MLflow's search, the
loss curves from the run folders) and :func:`~harness.report.build_report` on it. Goal: under 5 s.

``python -m harness.benchmarks.report_bench`` runs it too (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import RunConfig
from harness.core.files import write_json_atomic
from harness.grid import cell_name
from harness.report.build import build_report
from harness.run.cell_state import CellState
from harness.run.folder import METRICS_FILE, RESULTS_FILE, write_status
from harness.tracking import (DB_NAME, create_cell_runs, experiment_exists, prepare_store, set_state,
                              sqlite_uri, start_parent_run, sync_run)
from harness.tracking import read as tracking_read
from harness.tracking.schema import LOSS_KEY, LR_KEY, cell_tags
from harness.tracking.store import find_experiment

# Grid used by the benchmark: the three MILAN axes plus two extra ones, large enough that
# 8 seeds x the first 125 cells give 1,000 runs.
SYNTHETIC_AXES: dict[str, list[object]] = {
    "model.target": ["pixel", "clip"],
    "model.decoder": ["standard", "prompting"],
    "model.masking": ["random", "semantic"],
    "model.mask_ratio": [0.75, 0.5, 0.6, 0.85],
    "model.decoder_depth": [8, 2, 4, 6],
}
METRICS = ["linear_top1", "knn_top1", "finetune_top1", "final_loss", "images_per_s",
           "peak_memory_mb", "gpu_hours"]
FAILURE_REASONS = ["CUDA out of memory", "NaN loss at step 1200", "node failure"]
# Pretraining length of the synthetic ablation runs, and ImageNet-1K train size.
EPOCHS = 100
IMAGENET_TRAIN_IMAGES = 1_281_167
STATUS_P = {CellState.DONE.value: 0.9, CellState.FAILED.value: 0.04, CellState.PREEMPTED.value: 0.03,
            CellState.RUNNING.value: 0.02, CellState.PENDING.value: 0.01}


def synthetic_runs(
    n_runs: int = 1000, n_steps: int = 100, *, n_seeds: int = 8, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Realistic `runs` and `curves` frames: n_runs runs (cells x n_seeds), n_steps points.

    Cells are taken in grid order from SYNTHETIC_AXES, so the grid is partial when n_runs
    is not a multiple of a full grid. Metrics carry MILAN-like effects plus seed noise.
    """
    rng = np.random.default_rng(seed)
    n_cells = math.ceil(n_runs / n_seeds)
    cells = pd.DataFrame(
        itertools.islice(itertools.product(*SYNTHETIC_AXES.values()), n_cells),
        columns=list(SYNTHETIC_AXES),
    )
    cells["cell"] = _cell_names(cells)
    cells["cell_id"] = [f"c{i:04d}" for i in range(len(cells))]
    runs = cells.merge(pd.DataFrame({"seed": range(n_seeds)}), how="cross").head(n_runs)
    runs = _add_status(runs, rng)
    runs = _add_metrics(runs, rng)
    runs.attrs = {
        "axes": list(SYNTHETIC_AXES),
        "axis_baselines": {axis: values[0] for axis, values in SYNTHETIC_AXES.items()},
        "grid": "synthetic",
        "paper_setting": False,
        "metrics": METRICS,
    }
    return runs, _curves(runs, n_steps, rng)


def _cell_names(cells: pd.DataFrame) -> pd.Series:
    """'target=clip decoder=prompting ...' from the axis columns (short axis names)."""
    parts = [axis.split(".")[-1] + "=" + cells[axis].astype(str) for axis in SYNTHETIC_AXES]
    return pd.concat(parts, axis=1).agg(" ".join, axis=1)


def _add_status(runs: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    status = rng.choice(list(STATUS_P), size=len(runs), p=list(STATUS_P.values()))
    reason = pd.Series(rng.choice(FAILURE_REASONS, size=len(runs)), index=runs.index)
    return runs.assign(
        status=status,
        failure_reason=reason.where(status == CellState.FAILED.value),
    )


def _add_metrics(runs: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    clip = (runs["model.target"] == "clip").to_numpy()
    prompting = (runs["model.decoder"] == "prompting").to_numpy()
    semantic = (runs["model.masking"] == "semantic").to_numpy()
    ratio = runs["model.mask_ratio"].to_numpy(float)
    depth = runs["model.decoder_depth"].to_numpy(float)
    noise = rng.normal(0, 0.15, size=(4, len(runs)))
    # Accuracy peaks at mask ratio 0.75; CLIP targets matter most (paper: ~+10 linear).
    quality = 10 * clip + 1.2 * prompting + 0.8 * semantic - 20 * (ratio - 0.75) ** 2
    throughput = 456 * (1 + 0.2 * prompting) * (1.6 - ratio) / 0.85 * (1.1 - depth / 80)
    throughput *= np.where(clip, 0.8, 1.0)  # the CLIP teacher forward costs time
    metrics = pd.DataFrame(
        {
            "linear_top1": 68 + quality + noise[0],
            "knn_top1": 60 + 0.9 * quality + noise[1],
            "finetune_top1": 83.6 + 0.15 * quality + noise[2],
            "final_loss": np.where(clip, 0.55, 0.42) + 0.01 * noise[3],
            "images_per_s": throughput * rng.normal(1, 0.02, len(runs)),
            "peak_memory_mb": 30000 + 2000 * depth / 8 + 6000 * clip,
            # Device-hours = images seen / per-device throughput, whatever the device count.
            "gpu_hours": EPOCHS * IMAGENET_TRAIN_IMAGES / throughput / 3600,
        },
        index=runs.index,
    )
    # Only finished runs have evaluation numbers; the others spent part of their budget.
    unfinished = runs["status"] != CellState.DONE.value
    metrics.loc[unfinished, ["linear_top1", "knn_top1", "finetune_top1", "final_loss"]] = np.nan
    metrics.loc[unfinished, "gpu_hours"] *= rng.uniform(0, 1, unfinished.sum())
    pending = runs["status"] == CellState.PENDING.value
    metrics.loc[pending, ["images_per_s", "peak_memory_mb", "gpu_hours"]] = np.nan
    return pd.concat([runs, metrics], axis=1)


def _curves(runs: pd.DataFrame, n_steps: int, rng: np.random.Generator) -> pd.DataFrame:
    """Exponentially decaying losses, on different scales for pixel and CLIP targets."""
    started = runs[runs["status"] != CellState.PENDING.value]
    steps = np.linspace(0, 20_000, n_steps).astype(int)
    clip = (started["model.target"] == "clip").to_numpy()[:, None]
    # Higher mask ratios leave less context, so the loss plateaus higher.
    ratio = started["model.mask_ratio"].to_numpy(float)[:, None]
    start = np.where(clip, 1.6, 1.0)
    end = np.where(clip, 0.55, 0.42) + 0.3 * (ratio - 0.75)
    loss = end + (start - end) * np.exp(-steps[None, :] / 3000)
    loss *= rng.normal(1, 0.01, size=loss.shape)
    curves = started[["cell_id", "cell", "seed", "model.target"]].rename(
        columns={"model.target": "target"}
    ).loc[started.index.repeat(n_steps)]
    return curves.assign(step=np.tile(steps, len(started)), loss=loss.ravel()).reset_index(
        drop=True
    )


# --- the same report read from a real MLflow store -------------------------------------------

GRID = "synthetic"
GOAL_S = 5.0
# MLflow metric key of each report column that populate() writes (report column -> metric)
SUMMARY_KEYS = {"linear_top1": "linear_top1", "knn_top1": "knn_top1", "finetune_top1": "finetune_top1",
                "final_loss": "final_loss", "images_per_s": "images_per_s",
                "peak_memory_mb": "peak_memory_mb", "gpu_hours": "gpu_hours"}


@dataclass(frozen=True)
class BenchResult:
    n_runs: int
    n_points: int
    populate_s: float
    search_s: float  # MLflow's search_runs, every page
    frame_s: float  # the runs frame from the searched runs
    curves_s: float  # loss curves: run folders, MLflow for the runs without one
    build_s: float
    cpu_s: float = float("nan")  # CPU seconds of load + build, figure workers included
    load_avg: float = float("nan")  # 1-minute load average when it ended: other work slows it

    @property
    def load_s(self) -> float:
        return self.search_s + self.frame_s + self.curves_s

    @property
    def total_s(self) -> float:
        return self.load_s + self.build_s


def populate(uri: str, runs: pd.DataFrame, curves: pd.DataFrame, runs_root: Path, grid: str = GRID, *,
             progress: bool = False) -> str:
    """Write the synthetic ``runs``/``curves`` frames to the store as a grid, with a run folder
    per started run under ``runs_root``; returns the experiment id."""
    experiment_id = prepare_store(uri, grid)
    axes = [{"name": name, "values": values, "baseline": values[0]} for name, values in SYNTHETIC_AXES.items()]
    parent = start_parent_run(uri, experiment_id, grid=grid, tags={"executor": "local"}, axes=axes)
    base = RunConfig()
    rows = runs.to_dict("records")
    cells, folders = [], []
    for row in rows:
        values = {name: (row[name].item() if isinstance(row[name], np.generic) else row[name]) for name in SYNTHETIC_AXES}
        cfg = base.with_overrides({**values, "seed": int(row["seed"])})
        folder = runs_root / cfg.run_id()
        tags = cell_tags(cfg, grid=grid, cell=cell_name(values), axis_values=values, executor="local",
                         git_commit="synthetic", run_dir=folder.absolute())
        cells.append({"run_name": f"{cell_name(values)} seed={cfg.seed}", "params": cfg.flat(), "tags": tags})
        folders.append(folder)
    run_ids = create_cell_runs(uri, experiment_id, parent_run_id=parent, cells=cells)
    loss_by_run = {key: group for key, group in curves.groupby(["cell_id", "seed"], sort=False)}
    start = time.perf_counter()
    for count, (row, folder, run_id) in enumerate(zip(rows, folders, run_ids), 1):
        state = CellState(row["status"])
        if state != CellState.PENDING:  # a pending cell's job has not made its folder yet
            folder.mkdir(parents=True, exist_ok=True)
            write_status(folder, CellState.RUNNING, new_attempt=True, stage="pretrain")
            points = loss_by_run.get((row["cell_id"], row["seed"]))
            lines = [] if points is None else [
                f'{{"step": {int(step)}, "time": 0.0, "{LOSS_KEY}": {float(loss)!r}, "{LR_KEY}": 0.0001}}'
                for step, loss in zip(points["step"], points["loss"])]
            last = int(points["step"].iloc[-1]) if points is not None else 0
            speed = {k: float(row[k]) for k in ("images_per_s", "peak_memory_mb") if not pd.isna(row[k])}
            lines.append(f'{{"step": {last}, "time": 0.0, ' + ", ".join(
                f'"train/{k}": {v!r}' for k, v in speed.items()) + "}")
            (folder / METRICS_FILE).write_text("\n".join(lines) + "\n")
            if state == CellState.DONE:
                results = {key: float(row[column]) for column, key in SUMMARY_KEYS.items() if not pd.isna(row[column])}
                write_json_atomic(folder / RESULTS_FILE, {"metrics": results, "steps": last})
            reason = row["failure_reason"] if isinstance(row["failure_reason"], str) else None
            write_status(folder, state, reason=reason)
            sync_run(folder, uri, run_id)
        if progress and count % 100 == 0:
            print(f"  filled {count}/{len(rows)} runs ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    set_state(uri, parent, CellState.DONE)
    return experiment_id


def run_benchmark(n_runs: int = 1000, n_steps: int = 100, store: Path | None = None,
                  out_dir: Path | None = None) -> BenchResult:
    """Populate a SQLite store and its run folders (reused when ``store`` already holds the grid;
    the folders are in ``runs/`` beside it) and time a report read from it."""
    # A fresh store is filled on tmpfs where there is one: filling is fsync-bound on disk and
    # not what is measured; reading hits the page cache either way.
    shm = Path("/dev/shm")
    tmp_parent = str(shm) if store is None and shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=tmp_parent) as tmp:
        db = Path(store) if store else Path(tmp) / DB_NAME
        db.parent.mkdir(parents=True, exist_ok=True)
        uri = sqlite_uri(db)
        start = time.perf_counter()
        existing = db.exists() and experiment_exists(uri, GRID)
        if not existing:
            runs, curves = synthetic_runs(n_runs, n_steps)
            populate(uri, runs, curves, db.parent / "runs", progress=True)
        populate_s = time.perf_counter() - start

        # tracking.load_runs, step by step
        cpu_start = _cpu_seconds()
        start = time.perf_counter()
        experiment = find_experiment(uri, GRID)
        raw = tracking_read.read_runs(uri, experiment.experiment_id)
        search_s = time.perf_counter() - start
        start = time.perf_counter()
        tracking_read.overlay_run_folders(raw)
        runs = tracking_read.assemble(raw, experiment.name, experiment.experiment_id)
        frame_s = time.perf_counter() - start
        start = time.perf_counter()
        curves = tracking_read.load_curves(uri, runs, raw)
        curves_s = time.perf_counter() - start
        start = time.perf_counter()
        build_report(runs, curves, Path(out_dir) if out_dir else Path(tmp) / "report")
        build_s = time.perf_counter() - start
        return BenchResult(len(runs), len(curves), populate_s if not existing else 0.0, search_s, frame_s,
                           curves_s, build_s, cpu_s=_cpu_seconds() - cpu_start, load_avg=os.getloadavg()[0])


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the figure workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def report_lines(result: BenchResult) -> str:
    verdict = "OK" if result.total_s < GOAL_S else "OVER"
    lines = []
    if result.populate_s:
        lines.append(f"filled a SQLite MLflow store and run folders with {result.n_runs} runs in "
                     f"{result.populate_s:.1f} s")
    lines.append(f"load ({result.n_runs} runs, {result.n_points} loss points): {result.load_s:.2f} s = "
                 f"search_runs {result.search_s:.2f} + runs frame {result.frame_s:.2f} + "
                 f"loss curves {result.curves_s:.2f}")
    lines.append(f"tables and figures (build_report, all formats): {result.build_s:.2f} s")
    lines.append(f"report from MLflow, total: {result.total_s:.2f} s (goal < {GOAL_S:.0f} s: {verdict}); "
                 f"{result.cpu_s:.2f} CPU-s, {os.cpu_count()} CPUs, load average {result.load_avg:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> BenchResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100, help="loss points per run")
    parser.add_argument("--store", type=Path, default=None,
                        help="SQLite file to fill (reused if it already holds the grid) [default: a temp file]")
    parser.add_argument("--out", type=Path, default=None, help="report folder [default: a temp folder]")
    args = parser.parse_args(argv)
    result = run_benchmark(args.runs, args.steps, args.store, args.out)
    print(report_lines(result))
    return result


if __name__ == "__main__":
    main()
