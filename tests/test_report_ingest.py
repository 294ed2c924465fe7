"""harness.report.ingest and `bench.py report` on a small finished grid in real MLflow stores."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.config import RunConfig
from harness.report import ingest
from harness.report.ingest import downsample, load_runs
from harness.tracking import (
    MlflowRunLogger,
    TrackingError,
    cell_tags,
    client,
    create_cell_run,
    finish_run,
    log_summary_metrics,
    mark_run,
    prepare_store,
    run_name,
    sqlite_uri,
    start_parent_run,
)
from harness.tracking.server import free_port

GRID = "ingest-grid"
AXES = [
    {"name": "model.target", "values": ["pixel", "clip"], "baseline": "pixel"},
    {"name": "model.masking", "values": ["random", "semantic"], "baseline": "random"},
]
SEEDS = (0, 1)
N_STEPS = 10
FAILED = ("clip", "random", 1)
PENDING = ("clip", "semantic", 1)
REASON = "CUDA out of memory\n  while allocating 2 GiB"


def linear(target: str, masking: str, seed: int) -> float:
    return 50 + 5 * (target == "clip") + 1 * (masking == "semantic") + 0.1 * seed


def log_cell(uri: str, exp_id: str, parent: str, target: str, masking: str, seed: int, *,
             status: str, top1: float | None = None, reason: str | None = None) -> str:
    values = {"model.target": target, "model.masking": masking}
    cfg = RunConfig().with_overrides({**values, "seed": seed, "model.mask_ratio": 0.75})
    run_id = create_cell_run(uri, exp_id, parent_run_id=parent, run_name=run_name(values, seed),
                             params=cfg.flat(), tags=cell_tags(cfg, grid=GRID, axis_values=values,
                                                               executor="local", git_commit="t"))
    if status == "pending":
        return run_id
    logger = MlflowRunLogger(uri, run_id, flush_interval_s=None)
    for step in range(1, N_STEPS + 1):
        logger.log_metrics({"train/loss": (1.5 if target == "clip" else 0.5) / step, "train/lr": 0.01}, step)
    logger.log_metrics({"train/images_per_s": 400.0 + seed, "train/peak_memory_mb": 900.0}, N_STEPS)
    logger.flush()
    if status == "done":
        log_summary_metrics(uri, run_id, {
            "linear_top1": top1 if top1 is not None else linear(target, masking, seed),
            "knn_top1": 40.0 + seed, "final_loss": 0.05, "images_per_s": 410.0 + seed,
            "peak_memory_mb": 1000.0, "device_hours": 0.5, "train_seconds": 1800.0,
            "linear_top5": 90.0}, step=N_STEPS)
    mark_run(uri, run_id, status, reason)
    return run_id


def make_grid(uri: str) -> dict[str, str]:
    """Two `ablate` invocations of a 2x2 grid x 2 seeds. The first: everything ran, one run
    failed, one is still pending. The second re-ran two runs: one finished with a new value
    (it replaces the old one), one failed (the older finished run stays)."""
    exp_id = prepare_store(uri, GRID)
    first = start_parent_run(uri, exp_id, grid=GRID, tags={"executor": "local"}, axes=AXES)
    for target, masking, seed in itertools.product(["pixel", "clip"], ["random", "semantic"], SEEDS):
        key = (target, masking, seed)
        status = "failed" if key == FAILED else "pending" if key == PENDING else "done"
        log_cell(uri, exp_id, first, target, masking, seed, status=status,
                 reason=REASON if status == "failed" else None)
    finish_run(uri, first, "done")
    time.sleep(0.01)
    second = start_parent_run(uri, exp_id, grid=GRID, tags={"executor": "local"}, axes=AXES)
    log_cell(uri, exp_id, second, "pixel", "random", 0, status="done", top1=99.0)
    log_cell(uri, exp_id, second, "pixel", "semantic", 0, status="failed", reason="node failure")
    finish_run(uri, second, "done")
    return {"experiment_id": exp_id, "first": first, "second": second}


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    uri = sqlite_uri(tmp_path_factory.mktemp("ingest") / "mlflow.db")
    return uri, make_grid(uri)


def row(runs: pd.DataFrame, target: str, masking: str, seed: int) -> pd.Series:
    match = runs[(runs["model.target"] == target) & (runs["model.masking"] == masking) & (runs["seed"] == seed)]
    assert len(match) == 1
    return match.iloc[0]


# --- load_runs -----------------------------------------------------------------------------------

@pytest.fixture
def no_slow_path(monkeypatch):
    """Fail if the per-run fallbacks are used: the fast paths must work on these stores."""
    def refuse(*args, **kwargs):
        raise AssertionError("fell back to a slow path")

    monkeypatch.setattr(ingest, "_curves_per_run", refuse)
    monkeypatch.setattr(ingest, "read_mlflow", refuse)


def test_runs_frame_matches_the_report_contract(grid_store, no_slow_path):
    uri, ids = grid_store
    runs, _ = load_runs(uri, GRID)
    assert len(runs) == 8  # 2 x 2 cells x 2 seeds: the re-runs are not counted twice
    for column in ["cell_id", "cell", "seed", "status", "failure_reason", "model.target", "model.masking",
                   "linear_top1", "knn_top1", "finetune_top1", "final_loss", "images_per_s",
                   "peak_memory_mb", "gpu_hours", "linear_top5", "mlflow_run_id", "parent_run_id"]:
        assert column in runs, column
    assert runs.attrs["axes"] == ["model.target", "model.masking"]
    assert runs.attrs["axis_baselines"] == {"model.target": "pixel", "model.masking": "random"}
    assert runs.attrs["grid"] == GRID and runs.attrs["paper_setting"] is False
    assert runs.attrs["parent_run_id"] == ids["second"]
    assert runs.attrs["metrics"][:7] == ["linear_top1", "knn_top1", "finetune_top1", "final_loss",
                                         "images_per_s", "peak_memory_mb", "gpu_hours"]
    assert "linear_top5" in runs.attrs["metrics"] and "train_seconds" in runs.attrs["metrics"]
    assert runs["cell_id"].nunique() == 4 and runs.groupby("cell_id")["cell"].nunique().eq(1).all()
    # grid order: baseline values first
    assert list(runs["cell"].drop_duplicates()) == [
        "target=pixel masking=random", "target=pixel masking=semantic",
        "target=clip masking=random", "target=clip masking=semantic"]
    # config columns typed back from params
    assert runs["pretrain.epochs"].dtype == float and runs["pretrain.batch_size"].dtype == np.int64
    assert runs["model.norm_pix_loss"].dtype == bool and runs["model.mask_ratio"].eq(0.75).all()
    assert runs["seed"].dtype == np.int64 and runs["teacher.model"].eq("ViT-B-16-quickgelu").all()


def test_values_statuses_and_failures(grid_store):
    uri, _ = grid_store
    runs, _ = load_runs(uri, GRID)
    done = row(runs, "clip", "semantic", 0)
    assert done["status"] == "done" and pd.isna(done["failure_reason"])
    assert done["linear_top1"] == pytest.approx(linear("clip", "semantic", 0))
    assert done["gpu_hours"] == 0.5 and done["images_per_s"] == 410.0 and done["knn_top1"] == 40.0
    assert pd.isna(done["finetune_top1"])  # never logged
    failed = row(runs, *FAILED)
    assert failed["status"] == "failed"
    assert failed["failure_reason"] == "CUDA out of memory | while allocating 2 GiB"
    assert pd.isna(failed["linear_top1"]) and pd.isna(failed["gpu_hours"])
    assert failed["images_per_s"] == 401.0  # from train/images_per_s: the training part ran
    pending = row(runs, *PENDING)
    assert pending["status"] == "pending" and pd.isna(pending["images_per_s"])
    assert sorted(runs["status"].value_counts().items()) == [("done", 6), ("failed", 1), ("pending", 1)]


def test_newest_finished_run_wins_over_older_and_failed_reruns(grid_store):
    uri, ids = grid_store
    runs, _ = load_runs(uri, GRID)
    assert runs.attrs["duplicates_dropped"] == 2
    rerun = row(runs, "pixel", "random", 0)
    assert rerun["linear_top1"] == 99.0 and rerun["parent_run_id"] == ids["second"]
    kept = row(runs, "pixel", "semantic", 0)  # its re-run failed: the finished one counts
    assert kept["status"] == "done" and kept["parent_run_id"] == ids["first"]


def test_curves(grid_store, no_slow_path):
    uri, _ = grid_store
    runs, curves = load_runs(uri, GRID)
    assert list(curves.columns) == ["cell_id", "cell", "seed", "target", "step", "loss"]
    per_run = curves.groupby(["cell_id", "seed"])["step"].apply(list)
    assert len(per_run) == 7  # every run but the pending one
    assert all(steps == list(range(1, N_STEPS + 1)) for steps in per_run)
    clip = curves[curves["target"] == "clip"]
    assert clip.loc[clip["step"] == 2, "loss"].eq(0.75).all()
    assert set(curves["cell_id"]) <= set(runs["cell_id"])


def test_fast_paths_match_mlflow_api(grid_store):
    uri, _ = grid_store
    fast_runs, fast_curves = load_runs(uri, GRID)
    api_runs, api_curves = load_runs(uri, GRID, fast=False)
    pd.testing.assert_frame_equal(fast_runs, api_runs)
    pd.testing.assert_frame_equal(fast_curves, api_curves)
    assert fast_runs.attrs == api_runs.attrs


def test_http_store_reads_like_sqlite(mlflow_server, monkeypatch):
    ids = make_grid(mlflow_server.url)
    monkeypatch.setattr(ingest, "_curves_per_run", lambda *a: pytest.fail("bulk history not used"))
    http_runs, http_curves = load_runs(mlflow_server.url, GRID)
    monkeypatch.undo()
    file_runs, file_curves = load_runs(mlflow_server.store_uri, GRID)
    pd.testing.assert_frame_equal(http_runs, file_runs)
    pd.testing.assert_frame_equal(http_curves, file_curves)
    assert http_runs.attrs["parent_run_id"] == ids["second"]


def test_experiment_by_id_and_unknown_names(grid_store):
    uri, ids = grid_store
    runs, _ = load_runs(uri, ids["experiment_id"])
    assert len(runs) == 8
    with pytest.raises(TrackingError, match=f"no grid or experiment 'nope'.*experiments: {GRID}"):
        load_runs(uri, "nope")


def test_downsample_keeps_ends_and_spacing():
    points = pd.DataFrame({"run_id": ["a"] * 1000 + ["b"] * 10, "step": list(range(1000)) + list(range(10)),
                           "loss": 1.0})
    kept = downsample(points, 100)
    a = kept[kept["run_id"] == "a"]["step"].tolist()
    assert a[0] == 0 and a[-1] == 999 and len(a) <= 101 and np.diff(a[:-1]).tolist() == [10] * 99
    assert kept[kept["run_id"] == "b"]["step"].tolist() == list(range(10))


# --- bench.py report -----------------------------------------------------------------------------

def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_report_command_end_to_end(grid_store, tmp_path):
    uri, ids = grid_store
    out = tmp_path / "reports" / GRID
    result = invoke("report", GRID, "--tracking-uri", uri, "--out", str(out), "--format", "md,csv")
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert f"MILAN ablation report: {GRID}" in report
    assert "8 runs: 6 done, 1 failed, 1 pending" in report
    assert "CUDA out of memory" in report  # failed cells appear, with their reason
    assert (out / "tables" / "cells.csv").is_file() and not (out / "tables" / "cells.tex").exists()
    assert (out / "figures" / "loss_curves.png").is_file()
    cells = pd.read_csv(out / "tables" / "cells.csv")
    assert len(cells) == 4
    logged = {f.path for f in client(uri).list_artifacts(ids["second"], "report")}
    assert {"report/report.md", "report/tables", "report/figures"} <= logged
    assert "logged to MLflow run" in result.output


def test_report_command_accepts_a_grid_yaml(grid_store, tmp_path):
    uri, _ = grid_store
    grid_file = tmp_path / "some-file.yaml"
    grid_file.write_text(f"name: {GRID}\naxes: {{}}\n")
    result = invoke("report", str(grid_file), "--tracking-uri", uri, "--out", str(tmp_path / "r"),
                    "--no-log", "--metric", "knn_top1")
    assert result.exit_code == 0, result.output
    assert "k-NN top-1" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.parametrize("case", ["unknown grid", "unknown metric", "dead server", "no store", "bad format",
                                  "missing grid file"])
def test_report_command_bad_input_is_one_line_exit_2(case, grid_store, tmp_path):
    uri, _ = grid_store
    args = {
        "unknown grid": ["report", "nope", "--tracking-uri", uri],
        "unknown metric": ["report", GRID, "--tracking-uri", uri, "--metric", "top1", "--out", str(tmp_path)],
        "dead server": ["report", GRID, "--tracking-uri", f"http://127.0.0.1:{free_port()}"],
        "no store": ["report", GRID, "--tracking-uri", sqlite_uri(tmp_path / "none.db")],
        "bad format": ["report", GRID, "--tracking-uri", uri, "--format", "md,pdf"],
        "missing grid file": ["report", "ablations/missing.yaml", "--tracking-uri", uri],
    }[case]
    expected = {
        "unknown grid": f"no grid or experiment 'nope' in {uri}; experiments: {GRID}",
        "unknown metric": "metric 'top1' has no values in these runs; available metrics: linear_top1, knn_top1",
        "dead server": "is not reachable",
        "no store": "no MLflow store at",
        "bad format": "unknown table format pdf",
        "missing grid file": "grid file ablations/missing.yaml does not exist",
    }[case]
    start = time.perf_counter()
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "none.db").exists()  # a report never creates a store


def test_report_finds_the_store_ablate_recorded(grid_store, tmp_path, monkeypatch):
    """Without --tracking-uri: the store in runs/<grid>/grid.json; when that is a server that no
    longer runs, the SQLite file behind it (from the server's state file) is read."""
    import json

    uri, _ = grid_store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs_dir = tmp_path / "runs"
    (runs_dir / GRID).mkdir(parents=True)
    record = runs_dir / GRID / "grid.json"
    record.write_text(json.dumps({"grid": GRID, "experiment": GRID, "tracking_uri": uri}))
    result = invoke("report", GRID, "--runs-dir", str(runs_dir), "--out", str(tmp_path / "a"), "--no-log")
    assert result.exit_code == 0, result.output

    dead = f"http://127.0.0.1:{free_port()}"
    record.write_text(json.dumps({"grid": GRID, "experiment": GRID, "tracking_uri": dead}))
    (runs_dir / ".mlflow-server").mkdir()
    (runs_dir / ".mlflow-server" / "mlflow-server.json").write_text(json.dumps({
        "url": dead, "pid": 999999, "port": 1, "host": "0.0.0.0", "store_uri": uri, "artifact_root": "",
        "log_path": "", "started_at": 0}))
    result = invoke("report", GRID, "--runs-dir", str(runs_dir), "--out", str(tmp_path / "b"), "--no-log")
    assert result.exit_code == 0, result.output
    assert "is not running: reading its store" in result.stderr
    assert (tmp_path / "b" / "report.md").is_file()


def test_parallel_figures_match_serial_ones(tmp_path, monkeypatch):
    """build_report draws figures in forked workers: same files, same bytes as drawn here."""
    from harness.report import build
    from harness.report.bench import synthetic_runs

    pools = []

    class CountingPool(build.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(build, "ProcessPoolExecutor", CountingPool)
    runs, curves = synthetic_runs(96, 20)
    monkeypatch.setenv("MILAN_BENCH_REPORT_WORKERS", "1")
    serial = build.build_report(runs, curves, tmp_path / "serial", formats=("md",))
    assert pools == []
    monkeypatch.setenv("MILAN_BENCH_REPORT_WORKERS", "2")
    parallel = build.build_report(runs, curves, tmp_path / "parallel", formats=("md",))
    assert pools == [(2,)]
    names = [p.relative_to(tmp_path / "serial") for p in serial.figures]
    assert names == [p.relative_to(tmp_path / "parallel") for p in parallel.figures] and len(names) == 4
    for name in names:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()
    report = (tmp_path / "parallel" / "report.md").read_text()
    assert report.split("\n", 3)[3] == (tmp_path / "serial" / "report.md").read_text().split("\n", 3)[3]
