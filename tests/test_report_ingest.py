"""harness.tracking.read and `bench.py report` on a small finished grid in real MLflow stores."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.run.cell_state import CellState
from harness.cli import app
from harness.config import RunConfig
from harness.core.files import write_json_atomic
from harness.grid import RANDOM_INIT_NAME, cell_name
from harness.tracking import read as ingest
from harness.tracking.read import load_runs, sample_indices
from harness.run.folder import METRICS_FILE, RESULTS_FILE, write_status
from harness.tracking.runs import create_cell_runs, set_state, start_parent_run
from harness.tracking.schema import GRID_FILE_TAG, GRID_MARGIN, GRID_OPTIONS, TrackingError, cell_tags
from harness.tracking.server import free_port
from harness.tracking.store import client, prepare_store, sqlite_uri
from harness.tracking.sync import sync_run
from harness.train.metrics_log import JsonlLogger

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
ELSEWHERE = ("clip", "semantic", 0)  # its run folder is on another machine: its curve comes from MLflow


def linear(target: str, masking: str, seed: int) -> float:
    return 50 + 5 * (target == "clip") + 1 * (masking == "semantic") + 0.1 * seed


def log_cell(uri: str, exp_id: str, parent: str, target: str, masking: str, seed: int, *,
             state: CellState, runs_root: Path, top1: float | None = None, reason: str | None = None,
             random_init: bool = False) -> str:
    """One cell as ``ablate`` and its job leave it: a pending run tagged with its run folder, then
    (unless pending) the folder a job writes (status.json, metrics.jsonl with a line torn by a
    kill at the end, results.json) mirrored into the run by ``sync_run``. The ELSEWHERE run's
    ``run_dir`` tag names a folder this machine cannot see. ``random_init``: the grid's reference
    cell as ``build_grid`` makes it (no axis values, ``pretrain.epochs`` 0, named "random init")."""
    values = {"model.target": target, "model.masking": masking}
    overrides = {"pretrain.epochs": 0, "pretrain.warmup_epochs": 0} if random_init else {}
    cfg = RunConfig().with_overrides({**values, "seed": seed, "model.mask_ratio": 0.75, **overrides})
    run_dir = runs_root / f"{target}-{masking}-{seed}-{time.monotonic_ns()}"
    tagged_dir = Path("/nonexistent/cluster-scratch") / run_dir.name if (target, masking, seed) == ELSEWHERE else run_dir
    cell = RANDOM_INIT_NAME if random_init else cell_name(values)
    if random_init:
        values = {}
    tags = cell_tags(cfg, grid=GRID, cell=cell, axis_values=values, executor="local", git_commit="t",
                     run_dir=tagged_dir)
    [run_id] = create_cell_runs(uri, exp_id, parent_run_id=parent,
                                cells=[{"run_name": f"{cell} seed={seed}", "params": cfg.flat(), "tags": tags}])
    if state == CellState.PENDING:
        return run_id
    run_dir.mkdir(parents=True)
    write_status(run_dir, CellState.RUNNING, new_attempt=True, stage="pretrain")
    logger = JsonlLogger(run_dir / METRICS_FILE)
    for step in range(1, N_STEPS + 1):
        logger.log_metrics({"train/loss": (1.5 if target == "clip" else 0.5) / step, "train/lr": 0.01}, step)
    logger.log_metrics({"train/images_per_s": 400.0 + seed, "train/peak_memory_mb": 900.0}, N_STEPS)
    if state == CellState.DONE:
        metrics = {"linear_top1": top1 if top1 is not None else linear(target, masking, seed),
                   "knn_top1": 40.0 + seed, "final_loss": 0.05, "images_per_s": 410.0 + seed,
                   "peak_memory_mb": 1000.0, "gpu_hours": 0.5, "train_seconds": 1800.0, "linear_top5": 90.0}
        logger.log_metrics(metrics, N_STEPS)
        write_json_atomic(run_dir / RESULTS_FILE, {"metrics": metrics, "steps": N_STEPS})
    logger.flush()  # what a checkpoint does (a run's log holds what its checkpoints cover)
    with (run_dir / METRICS_FILE).open("a") as f:
        f.write('{"step": 11, "time": 1.0, "train/lo')  # torn by a kill mid-write: skipped
    write_status(run_dir, state, reason=reason)
    sync_run(run_dir, uri, run_id)
    return run_id


def make_grid(uri: str, runs_root: Path) -> dict[str, str]:
    """Two `ablate` invocations of a 2x2 grid x 2 seeds. The first: everything ran, one run
    failed, one is still pending. The second re-ran two runs: one finished with a new value
    (it replaces the old one), one failed (the older finished run stays)."""
    exp_id = prepare_store(uri, GRID)
    first = start_parent_run(uri, exp_id, grid=GRID, tags={"executor": "local"}, axes=AXES)
    for target, masking, seed in itertools.product(["pixel", "clip"], ["random", "semantic"], SEEDS):
        key = (target, masking, seed)
        state = CellState.FAILED if key == FAILED else CellState.PENDING if key == PENDING else CellState.DONE
        log_cell(uri, exp_id, first, target, masking, seed, state=state, runs_root=runs_root,
                 reason=REASON if state == CellState.FAILED else None)
    set_state(uri, first, CellState.DONE)
    time.sleep(0.01)
    second = start_parent_run(uri, exp_id, grid=GRID, tags={"executor": "local"}, axes=AXES)
    log_cell(uri, exp_id, second, "pixel", "random", 0, state=CellState.DONE, runs_root=runs_root, top1=99.0)
    log_cell(uri, exp_id, second, "pixel", "semantic", 0, state=CellState.FAILED, runs_root=runs_root,
             reason="node failure")
    set_state(uri, second, CellState.DONE)
    return {"experiment_id": exp_id, "first": first, "second": second}


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    base = tmp_path_factory.mktemp("ingest")
    uri = sqlite_uri(base / "mlflow.db")
    return uri, make_grid(uri, base / "runs")


def row(runs: pd.DataFrame, target: str, masking: str, seed: int) -> pd.Series:
    match = runs[(runs["model.target"] == target) & (runs["model.masking"] == masking) & (runs["seed"] == seed)]
    assert len(match) == 1
    return match.iloc[0]


# --- load_runs -----------------------------------------------------------------------------------

@pytest.fixture
def history_calls(monkeypatch) -> list[str]:
    """The run ids whose loss curve load_runs asks MLflow for."""
    asked: list[str] = []
    from_mlflow = ingest._points_from_mlflow

    def counting(uri, run_ids):
        asked.extend(run_ids)
        return from_mlflow(uri, run_ids)

    monkeypatch.setattr(ingest, "_points_from_mlflow", counting)
    return asked


def test_runs_frame_matches_the_report_contract(grid_store):
    uri, ids = grid_store
    runs, _ = load_runs(uri, GRID)
    assert len(runs) == 8  # 2 x 2 cells x 2 seeds: the re-runs are not counted twice
    for column in ["cell_id", "cell", "seed", "status", "failure_reason", "role", "model.target", "model.masking",
                   "linear_top1", "knn_top1", "finetune_top1", "final_loss", "images_per_s",
                   "peak_memory_mb", "gpu_hours", "linear_top5", "tracking_run_id", "parent_run_id"]:
        assert column in runs, column
    assert runs.attrs["axes"] == ["model.target", "model.masking"]
    assert runs.attrs["axis_baselines"] == {"model.target": "pixel", "model.masking": "random"}
    assert runs.attrs["grid"] == GRID and runs.attrs["paper_setting"] is False
    # parents without grid.margin / grid_file / grid.options tags (older ablate): the defaults
    assert runs.attrs["margin"] is None and runs.attrs["grid_file"] is None and runs.attrs["grid_options"] == ""
    assert runs["role"].eq("cell").all()  # no 0-epoch run: no random-init reference
    assert runs.attrs["parent_run_id"] == ids["second"]
    headlines = ["linear_top1", "knn_top1", "finetune_top1", "seg_upernet_miou", "seg_linear_miou"]
    assert runs.attrs["metrics"][:10] == [*headlines, "final_loss", "images_per_s", "peak_memory_mb", "gpu_hours",
                                          "cpu_core_hours"]
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


def test_curves_come_from_run_folders_else_from_mlflow(grid_store, history_calls):
    uri, _ = grid_store
    runs, curves = load_runs(uri, GRID)
    # only the run whose folder is not here; the pending one has no folder yet, and no loss
    # in MLflow either: no request
    assert history_calls == [row(runs, *ELSEWHERE)["tracking_run_id"]]
    assert list(curves.columns) == ["cell_id", "cell", "seed", "target", "step", "loss"]
    per_run = curves.groupby(["cell_id", "seed"])["step"].apply(list)
    assert len(per_run) == 7  # every run but the pending one
    assert all(steps == list(range(1, N_STEPS + 1)) for steps in per_run)
    clip = curves[curves["target"] == "clip"]
    assert clip.loc[clip["step"] == 2, "loss"].eq(0.75).all()
    assert set(curves["cell_id"]) <= set(runs["cell_id"])


def test_run_folder_curves_match_mlflow(grid_store, history_calls):
    uri, _ = grid_store
    folder_runs, folder_curves = load_runs(uri, GRID)
    api_runs, api_curves = load_runs(uri, GRID, run_folders=False)
    assert len(history_calls) == 1 + 7  # ELSEWHERE's, then those of the 7 runs that logged a loss
    pd.testing.assert_frame_equal(folder_runs, api_runs)
    pd.testing.assert_frame_equal(folder_curves, api_curves)
    assert folder_runs.attrs == api_runs.attrs


def test_http_store_reads_like_sqlite(mlflow_server, tmp_path, history_calls):
    ids = make_grid(mlflow_server.url, tmp_path / "runs")
    http_runs, http_curves = load_runs(mlflow_server.url, GRID)
    assert len(history_calls) == 1
    file_runs, file_curves = load_runs(mlflow_server.store_uri, GRID)
    pd.testing.assert_frame_equal(http_runs, file_runs)
    pd.testing.assert_frame_equal(http_curves, file_curves)
    assert http_runs.attrs["parent_run_id"] == ids["second"]
    # every curve through the server (get_metric_history from a thread pool)
    api_runs, api_curves = load_runs(mlflow_server.url, GRID, run_folders=False)
    pd.testing.assert_frame_equal(api_curves, http_curves)


def test_status_without_a_usable_status_tag(tmp_path):
    """Runs whose ``status`` tag is missing, empty or unknown take their MLflow run status;
    a run still tagged running that MLflow ended as failed counts as failed."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    exp_id = prepare_store(uri, GRID)
    parent = start_parent_run(uri, exp_id, grid=GRID, tags={"executor": "local"}, axes=AXES)
    mlflow_client = client(uri)
    cases = {  # (target, masking): (status tag, MLflow status, expected)
        ("pixel", "random"): (None, "FINISHED", "done"),
        ("pixel", "semantic"): ("", "KILLED", "failed"),
        ("clip", "random"): ("running", "FAILED", "failed"),
        ("clip", "semantic"): ("weird", "RUNNING", "running"),
    }
    for (target, masking), (tag, mlflow_status, _) in cases.items():
        run_id = log_cell(uri, exp_id, parent, target, masking, 0, state=CellState.PENDING, runs_root=tmp_path)
        if tag is None:
            mlflow_client.delete_tag(run_id, "status")
        else:
            mlflow_client.set_tag(run_id, "status", tag)
        if mlflow_status == "RUNNING":
            mlflow_client.update_run(run_id, status="RUNNING")
        else:
            mlflow_client.set_terminated(run_id, mlflow_status)
    runs, curves = load_runs(uri, GRID)
    for (target, masking), (_, _, expected) in cases.items():
        assert row(runs, target, masking, 0)["status"] == expected, (target, masking)
    assert curves.empty and list(curves.columns) == ["cell_id", "cell", "seed", "target", "step", "loss"]


def test_random_init_role_and_parent_grid_tags(tmp_path):
    """A run whose ``pretrain.epochs`` param is 0 is the grid's random-init reference (role
    ``random_init``), the others are cells; the newest parent run's ``grid.margin``, ``grid_file``
    and ``grid.options`` tags come back as ``runs.attrs`` ``margin``, ``grid_file``, ``grid_options``."""
    uri = sqlite_uri(tmp_path / "mlflow.db")
    exp_id = prepare_store(uri, GRID)
    old = start_parent_run(uri, exp_id, grid=GRID, axes=AXES, tags={
        "executor": "local", GRID_MARGIN: 2.0, GRID_FILE_TAG: "ablations/old.yaml", GRID_OPTIONS: "--set seed=3"})
    log_cell(uri, exp_id, old, "pixel", "random", 0, state=CellState.DONE, runs_root=tmp_path)
    time.sleep(0.01)
    options = "--set 'pretrain.epochs=2' --axis model.masking=random,semantic"
    parent = start_parent_run(uri, exp_id, grid=GRID, axes=AXES, tags={
        "executor": "local", GRID_MARGIN: 0.25, GRID_FILE_TAG: "ablations/ingest-grid.yaml", GRID_OPTIONS: options})
    for target, masking in itertools.product(["pixel", "clip"], ["random", "semantic"]):
        log_cell(uri, exp_id, parent, target, masking, 0, state=CellState.DONE, runs_root=tmp_path)
    for seed in (0, 1):
        log_cell(uri, exp_id, parent, "pixel", "random", seed, state=CellState.DONE, runs_root=tmp_path,
                 random_init=True, top1=20.0 + seed)
    runs, _ = load_runs(uri, GRID)
    assert runs.attrs["parent_run_id"] == parent  # the newest parent's tags, not the older one's
    assert runs.attrs["margin"] == 0.25 and isinstance(runs.attrs["margin"], float)
    assert runs.attrs["grid_file"] == "ablations/ingest-grid.yaml"
    assert runs.attrs["grid_options"] == options
    reference = runs[runs["role"] == "random_init"]
    assert len(reference) == 2 and sorted(reference["seed"]) == [0, 1]
    assert reference["pretrain.epochs"].eq(0).all() and reference["cell"].eq(RANDOM_INIT_NAME).all()
    assert sorted(reference["linear_top1"]) == [20.0, 21.0]
    cells = runs[runs["role"] == "cell"]
    assert len(cells) == 4 and cells["pretrain.epochs"].gt(0).all() and cells["cell_id"].nunique() == 4
    assert len(runs) == 6 and set(runs["role"]) == {"cell", "random_init"}


def test_experiment_by_id_and_unknown_names(grid_store):
    uri, ids = grid_store
    runs, _ = load_runs(uri, ids["experiment_id"])
    assert len(runs) == 8
    with pytest.raises(TrackingError, match=f"no grid or experiment 'nope'.*experiments: {GRID}"):
        load_runs(uri, "nope")


def test_sample_indices_keep_ends_and_spacing():
    kept = sample_indices(1000, 100)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) <= 101 and np.diff(kept[:-1]).tolist() == [10] * 99
    assert sample_indices(10, 100).tolist() == list(range(10)) == sample_indices(10, None).tolist()
    assert sample_indices(1001, 100)[-2:].tolist() == [990, 1000]


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
    # effects with verdicts replace the main effects
    assert report.startswith("# ") and "**Verdicts**" in report.split("\n## ", 1)[0]
    assert (out / "tables" / "effects.csv").is_file() and (out / "figures" / "effects.png").is_file()
    assert not list(out.rglob("main_effects*"))
    assert "±0.5 points" in report  # the default margin: these parents carry no grid.margin
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
                    "--no-log", "--metric", "knn_top1", "--margin", "1.5")
    assert result.exit_code == 0, result.output
    report = (tmp_path / "r" / "report.md").read_text()
    assert "k-NN top-1" in report and "±1.5 points" in report and "±0.5 points" not in report


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
    """Without --tracking-uri: the store in runs/<grid>/grid.json; when its server no longer
    runs, the store itself is read."""
    import json

    uri, _ = grid_store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs_dir = tmp_path / "runs"
    (runs_dir / GRID).mkdir(parents=True)
    record = runs_dir / GRID / "grid.json"
    record.write_text(json.dumps({"grid": GRID, "experiment": GRID, "store": {"backend": uri}}))
    result = invoke("report", GRID, "--runs-dir", str(runs_dir), "--out", str(tmp_path / "a"), "--no-log")
    assert result.exit_code == 0, result.output

    server_dir = runs_dir / ".mlflow-server"
    server_dir.mkdir()
    (server_dir / "mlflow-server.json").write_text(json.dumps({
        "url": f"http://127.0.0.1:{free_port()}", "pid": 999999, "store_uri": uri}))
    record.write_text(json.dumps({"grid": GRID, "experiment": GRID,
                                  "store": {"backend": uri, "server_dir": str(server_dir)}}))
    result = invoke("report", GRID, "--runs-dir", str(runs_dir), "--out", str(tmp_path / "b"), "--no-log")
    assert result.exit_code == 0, result.output
    assert "is not running: reading its store" in result.stderr
    assert (tmp_path / "b" / "report.md").is_file()


def test_parallel_figures_match_serial_ones(tmp_path, monkeypatch):
    """build_report draws figures in forked workers: same files, same bytes as drawn here."""
    from harness.report import build
    from harness.benchmarks.report_bench import synthetic_runs

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


def test_report_bench_command_on_a_small_grid(tmp_path):
    """`bench.py report-bench` fills a store and run folders as ablate and the jobs do, then
    times the report; a second call reuses the store."""
    store = tmp_path / "bench" / "mlflow.db"
    result = invoke("report-bench", "--runs", "16", "--steps", "5", "--store", str(store))
    assert result.exit_code == 0, result.output
    assert "filled a SQLite MLflow store and run folders with 16 runs" in result.output
    assert "load (16 runs, " in result.output and "report from MLflow, total: " in result.output
    assert len(list((tmp_path / "bench" / "runs").glob("*/metrics.jsonl"))) >= 12
    again = invoke("report-bench", "--runs", "16", "--steps", "5", "--store", str(store))
    assert again.exit_code == 0 and "filled" not in again.output, again.output
