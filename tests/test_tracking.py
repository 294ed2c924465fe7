"""harness.tracking against real stores: a SQLite file and an `mlflow server` on loopback."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.run.cell_state import CellState
from harness.config import RunConfig
from harness.run.folder import FolderBusy, SchedulerStopWatch, hold, stopped_by_scheduler, write_status
from harness.tracking.runs import create_cell_runs, run_state, set_state, start_parent_run
from harness.tracking.schema import TrackingError, cell_tags, decode_param, encode_param
from harness.tracking.server import ensure_server, free_port, group_alive, read_state, stop_server
from harness.tracking import Store
from harness.tracking.store import check_store, client, default_tracking_uri, prepare_store, sqlite_uri
from harness.tracking.sync import SYNC_FILE, Mirror, backlog, sync_run
from harness.train.metrics_log import JsonlLogger

AXES = [
    {"name": "model.target", "values": ["pixel", "clip"], "baseline": "pixel"},
    {"name": "model.mask_ratio", "values": [0.75, 0.5], "baseline": 0.75},
]


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A prepared SQLite store (schema created once)."""
    uri = sqlite_uri(tmp_path_factory.mktemp("sqlite-store") / "mlflow.db")
    prepare_store(uri, "unit")
    return uri


def new_cell(uri: str, experiment: str = "unit", *, target: str = "clip", ratio: float = 0.75,
             seed: int = 0, parent: str | None = None) -> tuple[str, RunConfig]:
    exp_id = prepare_store(uri, experiment)
    parent = parent or start_parent_run(uri, exp_id, grid=experiment, tags={"executor": "local"}, axes=AXES)
    values = {"model.target": target, "model.mask_ratio": ratio}
    cfg = RunConfig().with_overrides({**values, "seed": seed})
    name = f"target={target} mask_ratio={ratio}"
    [run_id] = create_cell_runs(uri, exp_id, parent_run_id=parent, cells=[{
        "run_name": f"{name} seed={seed}", "params": cfg.flat(),
        "tags": cell_tags(cfg, grid=experiment, cell=name, axis_values=values, executor="local",
                          git_commit="abc123", run_dir="/runs/x")}])
    return run_id, cfg


def history(uri: str, run_id: str, key: str = "train/loss") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


# --- schema --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.75, 3, True, False, None, "clip", "rand-m9-mstd0.5-inc1", 1.5e-4, 400.0])
def test_params_round_trip_typed(value):
    assert decode_param(encode_param(value)) == value
    assert type(decode_param(encode_param(value))) is type(value)


def test_lists_stay_text():
    assert encode_param((0.9, 0.95)) == "[0.9, 0.95]"
    assert decode_param("[0.9, 0.95]") == "[0.9, 0.95]"
    assert math.isnan(decode_param(encode_param(math.nan)))


def test_default_tracking_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"


# --- the store -----------------------------------------------------------------------------------

def test_prepare_store_is_idempotent_and_restores(tmp_path):
    uri = sqlite_uri(tmp_path / "mlflow.db")
    first = prepare_store(uri, "grid-a")
    assert prepare_store(uri, "grid-a") == first
    assert prepare_store(uri, "grid-b") != first
    experiment = client(uri).get_experiment(first)
    assert Path(experiment.artifact_location) == tmp_path / "mlflow-artifacts" / "grid-a"
    client(uri).delete_experiment(first)
    assert prepare_store(uri, "grid-a") == first
    assert client(uri).get_experiment(first).lifecycle_stage == "active"


def test_check_store_dead_http_fails_fast_and_clearly():
    url = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(TrackingError) as err:
        check_store(url, timeout_s=2)
    assert time.perf_counter() - start < 3
    message = str(err.value)
    assert "\n" not in message and url in message and "not reachable" in message


def test_check_store_sqlite_problems(tmp_path):
    check_store(sqlite_uri(tmp_path / "new.db"))  # creatable
    with pytest.raises(TrackingError, match="no MLflow store"):
        check_store(sqlite_uri(tmp_path / "new.db"), must_exist=True)
    with pytest.raises(TrackingError, match="does not exist"):
        check_store(sqlite_uri(tmp_path / "missing" / "mlflow.db"))
    with pytest.raises(TrackingError, match="is a directory"):
        check_store(sqlite_uri(tmp_path))
    (tmp_path / "text.db").write_text("not a database")
    with pytest.raises(TrackingError, match="not a SQLite database"):
        check_store(sqlite_uri(tmp_path / "text.db"))
    with pytest.raises(TrackingError, match="file stores"):
        check_store("file:///tmp/mlruns")


# --- runs ----------------------------------------------------------------------------------------

def test_cell_run_round_trip(store):
    run_id, cfg = new_cell(store, target="pixel", ratio=0.5, seed=3)
    run = client(store).get_run(run_id)
    assert run.info.run_name == "target=pixel mask_ratio=0.5 seed=3"
    assert run.data.tags["status"] == "pending" and run.data.tags["axis.model.mask_ratio"] == "0.5"
    assert run.data.params["model.target"] == "pixel" and decode_param(run.data.params["seed"]) == 3
    assert run_state(store, run_id) == CellState.PENDING


def test_state_mirrors_the_cell_state_model(store):
    run_id, _ = new_cell(store)
    for state, mlflow_status in [(CellState.RUNNING, "RUNNING"), (CellState.REQUEUED, "RUNNING"),
                                 (CellState.FAILED, "FAILED"), (CellState.RUNNING, "RUNNING"),
                                 (CellState.DONE, "FINISHED")]:
        set_state(store, run_id, state, "why" if state == CellState.FAILED else None)
        run = client(store).get_run(run_id)
        assert (run_state(store, run_id), run.info.status) == (state, mlflow_status)
        assert run.data.tags["failure_reason"] == ("why" if state == CellState.FAILED else "")


def test_axes_must_name_a_baseline_among_values(store):
    exp_id = prepare_store(store, "unit")
    with pytest.raises(TrackingError, match="baseline"):
        start_parent_run(store, exp_id, grid="unit", tags={}, axes=[{"name": "a", "values": [1], "baseline": 2}])


# --- the run folder: lock, stop signals ------------------------------------------------------------

def test_a_duplicate_job_finds_the_folder_held_and_touches_nothing(tmp_path):
    folder = tmp_path / "cell"
    with hold(folder, rank=0):
        with hold(folder, rank=1):  # another rank of the same job has its own lock
            write_status(folder, CellState.RUNNING, new_attempt=True)
            before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
            for rank in (0, 1):  # every rank of a duplicate exits
                with pytest.raises(FolderBusy, match=r"is held by job pid \d+@.*: this job .* is a duplicate"):
                    with hold(folder, rank=rank):
                        write_status(folder, CellState.FAILED)  # never reached
        assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    with hold(folder, rank=0):  # released with the job
        pass


def test_sigterm_and_a_terminated_worker_are_scheduler_stops():
    seen, handled = [], []
    # a handler installed before the watch (submitit's bypass) still runs; without one the process
    # would terminate (the next test)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handled.append(signum))
    try:
        with SchedulerStopWatch(on_stop=seen.append) as watch:
            assert stopped_by_scheduler(RuntimeError("boom"), watch) is None
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
            assert seen == ["SIGTERM"] and handled == [signal.SIGTERM]
            assert "stopped by the scheduler (SIGTERM" in stopped_by_scheduler(RuntimeError(), watch)
    finally:
        signal.signal(signal.SIGTERM, previous)
    worker = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Terminated. ")
    assert "DataLoader worker was stopped by SIGTERM" in stopped_by_scheduler(worker, None)
    assert stopped_by_scheduler(RuntimeError("CUDA out of memory"), None) is None


# --- the mirror -------------------------------------------------------------------------------------

def log_steps(folder: Path, steps: range) -> None:
    logger = JsonlLogger(folder / "metrics.jsonl")
    for step in steps:
        logger.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
    logger.flush()


def test_sigterm_under_the_watch_still_terminates_a_process_without_a_handler():
    """The watch records the stop, then the process ends as SIGTERM ends it by default (exit -15)."""
    code = ("import os, signal, time\n"
            "from harness.run.folder import SchedulerStopWatch\n"
            "with SchedulerStopWatch(on_stop=lambda name: print('recorded', name, flush=True)):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGTERM and done.stdout == "recorded SIGTERM\n"


def test_sync_sends_every_step_exactly_once_even_when_interrupted(store, tmp_path):
    run_id, _ = new_cell(store)
    folder = tmp_path / "cell"
    folder.mkdir()
    log_steps(folder, range(1, 1201))  # 2,400 metrics: three requests
    write_status(folder, CellState.RUNNING, new_attempt=True, stage="pretrain", step=1200)
    assert "bytes of metrics" in backlog(folder) and "state running" in backlog(folder)
    sync_run(folder, store, run_id)
    assert backlog(folder) == ""
    # a sync killed after sending but before recording its offset sends the same points again
    record = json.loads((folder / SYNC_FILE).read_text())
    (folder / SYNC_FILE).write_text(json.dumps({**record, "offset": 0}))
    log_steps(folder, range(1201, 1211))
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1211, "train/lo')  # a line still being written waits for its newline
    sync_run(folder, store, run_id)
    assert history(store, run_id) == [(s, 1.0 / s) for s in range(1, 1211)]
    assert client(store).get_run(run_id).data.tags["stage"] == "pretrain"


def test_sync_of_a_finished_run_sends_results_and_artifacts(store, tmp_path):
    run_id, cfg = new_cell(store)
    folder = tmp_path / "done"
    folder.mkdir()
    (folder / "config.yaml").write_text(cfg.to_yaml())
    log_steps(folder, range(1, 4))
    (folder / "results.json").write_text(json.dumps({"metrics": {"linear_top1": 12.5, "final_loss": 0.3},
                                                     "steps": 3, "checkpoint": str(folder / "latest.pt")}))
    write_status(folder, CellState.DONE, stage="done", step=3)
    sync_run(folder, store, run_id)
    run = client(store).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["linear_top1"] == 12.5
    assert run.data.tags["checkpoint"].endswith("latest.pt")
    assert {a.path for a in client(store).list_artifacts(run_id)} == {"config.yaml", "metrics.jsonl"}
    assert backlog(folder) == ""


def test_an_unreachable_server_never_stops_the_runs_and_they_are_caught_up_later(store, tmp_path):
    """One mirror for a group job's cells: none stops while the server is down, all catch up."""
    cells = [(tmp_path / f"cell{i}", new_cell(store, ratio=ratio)[0]) for i, ratio in enumerate([0.75, 0.5])]
    for folder, _ in cells:
        folder.mkdir()
    dead = f"http://127.0.0.1:{free_port()}"
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        target = {"uri": dead}
        with Mirror(cells, lambda: target["uri"], interval_s=0.2) as mirror:
            for folder, _ in cells:
                log_steps(folder, range(1, 11))
                write_status(folder, CellState.RUNNING, new_attempt=True)
            time.sleep(0.5)
            assert not mirror.sync()
            for folder, _ in cells:
                assert "bytes of metrics" in backlog(folder)
                assert backlog(folder, live=True)  # status shows a live job that cannot reach the store
            target["uri"] = store  # the server is back (on another address)
            for folder, _ in cells:
                log_steps(folder, range(11, 21))
        assert [backlog(folder) for folder, _ in cells] == ["", ""]
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    for _, run_id in cells:
        assert [s for s, _ in history(store, run_id)] == list(range(1, 21))


# --- the server ------------------------------------------------------------------------------------

def test_server_is_found_again_after_a_restart_and_never_doubled(tmp_path):
    """The grid records its store: a server killed with -9 (its uvicorn child may go on serving)
    is replaced or reused, never joined by a second one, and comes back on the same port."""
    backend = sqlite_uri(tmp_path / "mlflow.db")
    store = Store(backend=backend, server_dir=str(tmp_path / "server"))
    first = ensure_server(backend, tmp_path / "artifacts", store.server_dir, host="127.0.0.1")
    try:
        assert store.server_url() == first.url and store.reader_uri() == first.url
        assert ensure_server(backend, tmp_path / "artifacts", store.server_dir, host="127.0.0.1").reused
        os.kill(first.pgid, signal.SIGKILL)  # the leader only, as `kill -9 <pid>` would
        second = ensure_server(backend, tmp_path / "artifacts", store.server_dir, host="127.0.0.1")
        assert second.port == first.port and store.server_url() == second.url
        if second.pgid != first.pgid:
            assert not group_alive(first.pgid)  # the orphaned children were stopped first
        exp = prepare_store(second.url, "after-restart")
        assert client(second.url).get_experiment(exp).name == "after-restart"
    finally:
        assert stop_server(store.server_dir)
    assert not group_alive(read_state(store.server_dir).pgid if read_state(store.server_dir) else first.pgid)
    assert store.reader_uri() == backend  # down: readers go to the store itself
    assert not stop_server(store.server_dir)


def test_server_for_another_store_is_refused(mlflow_server, tmp_path):
    with pytest.raises(TrackingError, match="another store"):
        ensure_server(sqlite_uri(tmp_path / "other.db"), tmp_path / "a", Path(mlflow_server.log_path).parent,
                      host="127.0.0.1")


def test_create_cell_runs_in_order_over_http(mlflow_server):
    exp = prepare_store(mlflow_server.url, "http-order")
    parent = start_parent_run(mlflow_server.url, exp, grid="http-order", tags={}, axes=[])
    cells = [{"run_name": f"cell {i}", "params": {"i": i}, "tags": {"cell": f"c{i}"}} for i in range(12)]
    ids = create_cell_runs(mlflow_server.url, exp, parent_run_id=parent, cells=cells)
    assert [client(mlflow_server.url).get_run(r).info.run_name for r in ids] == [f"cell {i}" for i in range(12)]
