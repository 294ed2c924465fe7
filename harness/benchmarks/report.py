"""Synthetic runs/curves frames and a timing benchmark for `build_report`.

Run `python -m harness.report.bench` to print how long a 1,000-run report takes, and
`python -m harness.report.bench --mlflow` to time it read from a SQLite MLflow store
(harness.report.mlflow_bench).
"""

from __future__ import annotations

import itertools
import math
import tempfile
import time

import numpy as np
import pandas as pd

from harness.report.build import build_report

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
STATUS_P = {"done": 0.9, "failed": 0.04, "preempted": 0.03, "running": 0.02, "pending": 0.01}


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
        failure_reason=reason.where(status == "failed"),
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
    unfinished = runs["status"] != "done"
    metrics.loc[unfinished, ["linear_top1", "knn_top1", "finetune_top1", "final_loss"]] = np.nan
    metrics.loc[unfinished, "gpu_hours"] *= rng.uniform(0, 1, unfinished.sum())
    pending = runs["status"] == "pending"
    metrics.loc[pending, ["images_per_s", "peak_memory_mb", "gpu_hours"]] = np.nan
    return pd.concat([runs, metrics], axis=1)


def _curves(runs: pd.DataFrame, n_steps: int, rng: np.random.Generator) -> pd.DataFrame:
    """Exponentially decaying losses, on different scales for pixel and CLIP targets."""
    started = runs[runs["status"] != "pending"]
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


def time_build_report(n_runs: int = 1000, n_steps: int = 100) -> float:
    """Seconds `build_report` takes (all formats and figures) on synthetic frames."""
    runs, curves = synthetic_runs(n_runs, n_steps)
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        build_report(runs, curves, out_dir)
        return time.perf_counter() - start


if __name__ == "__main__":
    import sys

    if "--mlflow" in sys.argv[1:]:  # the same report, read from a real SQLite MLflow store
        from harness.report.mlflow_bench import main

        main(sys.argv[1:])
    else:
        print(f"build_report, 1000 runs x 100 curve points: {time_build_report():.2f} s")
