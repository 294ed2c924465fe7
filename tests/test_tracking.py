"""harness.tracking against real stores: a SQLite file and an `mlflow server` on loopback."""

from __future__ import annotations

import json
import math
import pickle
import sys
import time
from pathlib import Path

import pytest

from harness.config import RunConfig
from harness.tracking import (
    CellLogger,
    MlflowRunLogger,
    TrackingError,
    cell_tags,
    check_store,
    client,
    create_cell_run,
    create_cell_runs,
    decode_param,
    default_tracking_uri,
    encode_param,
    ensure_server,
    finish_run,
    log_cell_artifacts,
    log_summary_metrics,
    mark_run,
    prepare_store,
    run_name,
    set_run_tags,
    sqlite_uri,
    start_parent_run,
    stop_server,
    system_metrics,
)
from harness.tracking.server import free_port, read_state
from harness.train.metrics_log import JsonlLogger, read_jsonl

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
    run_id = create_cell_run(uri, exp_id, parent_run_id=parent, run_name=run_name(values, seed),
                             params=cfg.flat(),
                             tags=cell_tags(cfg, grid=experiment, axis_values=values, executor="local",
                                            git_commit="abc123", run_dir="/runs/x"))
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
    params = {k: decode_param(v) for k, v in run.data.params.items()}
    flat = cfg.flat()
    assert params.keys() == flat.keys()
    for key, value in flat.items():
        assert params[key] == (encode_param(value) if isinstance(value, list) else value), key
    tags = run.data.tags
    assert tags["role"] == "cell" and tags["status"] == "pending" and tags["failure_reason"] == ""
    assert tags["cell_id"] == cfg.cell_id() and tags["config_run_id"] == cfg.run_id()
    assert tags["seed"] == "3" and tags["grid"] == "unit" and tags["executor"] == "local"
    assert tags["axis.model.target"] == "pixel" and tags["axis.model.mask_ratio"] == "0.5"
    assert tags["cell"] == "target=pixel mask_ratio=0.5"
    assert run.info.run_name == "target=pixel mask_ratio=0.5 seed=3"
    assert tags["git_commit"] == "abc123" and tags["run_dir"] == "/runs/x"
    parent = client(store).get_run(tags["mlflow.parentRunId"])
    assert parent.data.tags["role"] == "ablate"
    assert json.loads(parent.data.tags["grid.axes"]) == AXES
    finish_run(store, parent.info.run_id, "done")
    parent = client(store).get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "done"


def test_axes_must_name_a_baseline_among_values(store):
    with pytest.raises(TrackingError, match="baseline"):
        start_parent_run(store, prepare_store(store, "unit"), grid="unit", tags={},
                         axes=[{"name": "model.target", "values": ["clip"], "baseline": "pixel"}])


def test_mark_run_statuses(store):
    run_id, _ = new_cell(store)

    def state():
        run = client(store).get_run(run_id)
        return run.info.status, run.data.tags["status"], run.data.tags["failure_reason"]

    mark_run(store, run_id, "running")
    assert state() == ("RUNNING", "running", "")
    mark_run(store, run_id, "preempted", "SIGUSR2 near the time limit")
    assert state() == ("RUNNING", "preempted", "SIGUSR2 near the time limit")
    mark_run(store, run_id, "failed", "CUDA out of memory\n  at step 12")
    assert state() == ("FAILED", "failed", "CUDA out of memory | at step 12")
    mark_run(store, run_id, "requeued")
    assert state() == ("RUNNING", "requeued", "")
    mark_run(store, run_id, "done")
    assert state() == ("FINISHED", "done", "")
    with pytest.raises(TrackingError, match="run status"):
        mark_run(store, run_id, "finished")
    set_run_tags(store, run_id, {"slurm.job_id": "123_4"})
    assert client(store).get_run(run_id).data.tags["slurm.job_id"] == "123_4"


# --- the logger ----------------------------------------------------------------------------------

def test_logger_batches_and_last_step_is_exact(store, monkeypatch):
    run_id, _ = new_cell(store)
    logger = MlflowRunLogger(store, run_id, flush_interval_s=None)
    sizes = []
    original = client(store).log_batch

    def spy(run, metrics=(), **kwargs):
        sizes.append(len(metrics))
        return original(run, metrics=metrics, **kwargs)

    monkeypatch.setattr(client(store), "log_batch", spy)
    assert logger.last_step("train/loss") is None
    for step in range(1, 1201):  # 2400 metrics: two full batches are sent on the way
        logger.log_metrics({"train/loss": 1 / step, "train/lr": 1e-3}, step=step)
    assert sizes == [1000, 1000]
    assert logger.last_step("train/loss") == 1200  # 400 metrics still buffered count too
    logger.flush()
    assert sizes == [1000, 1000, 400]
    assert logger.stored_last_step("train/loss") == 1200
    logger.log_metrics({"train/loss": 0.5}, step=7)  # out of order: the maximum stays
    logger.flush()
    assert logger.last_step("train/loss") == 1200
    assert logger.last_step("train/lr") == 1200
    points = history(store, run_id)
    assert len(points) == 1201 and points[-1] == (1200, pytest.approx(1 / 1200))
    # a job receives a pickled logger: uri and run id only, a fresh buffer
    clone = pickle.loads(pickle.dumps(logger))
    assert (clone.uri, clone.run_id) == (store, run_id) and clone.last_step("train/loss") == 1200


def test_logger_flushes_on_time(store):
    run_id, _ = new_cell(store)
    logger = MlflowRunLogger(store, run_id, flush_interval_s=0.0)
    logger.log_metrics({"train/loss": 1.0}, step=1)
    assert history(store, run_id) == [(1, 1.0)]


def test_cell_logger_backfills_steps_mlflow_missed(store, tmp_path):
    """A kill between two MLflow flushes: the JSON-lines log is ahead; on resume the missing
    steps are sent, so MLflow has every step exactly once and no step is logged twice."""
    run_id, _ = new_cell(store)
    jsonl = tmp_path / "metrics.jsonl"
    first = CellLogger(jsonl, store, run_id, flush_interval_s=None)
    for step in range(1, 11):
        first.log_metrics({"train/loss": 1 / step, "train/lr": 0.1}, step=step)
    first.flush()
    for step in range(11, 16):  # logged locally, never flushed to MLflow: the job dies here
        first.log_metrics({"train/loss": 1 / step, "train/lr": 0.1}, step=step)
    first.local.flush()
    assert [s for s, _ in history(store, run_id)] == list(range(1, 11))

    resumed = CellLogger(jsonl, store, run_id, flush_interval_s=None)
    assert resumed.last_step("train/loss") == 15
    assert [s for s, _ in history(store, run_id)] == list(range(1, 16))
    assert [s for s, _ in history(store, run_id, "train/lr")] == list(range(1, 16))
    for step in range(16, 21):  # the loop continues after the last logged step
        resumed.log_metrics({"train/loss": 1 / step}, step=step)
    resumed.flush()
    assert [s for s, _ in history(store, run_id)] == list(range(1, 21))
    assert [r["step"] for r in read_jsonl(jsonl) if "train/loss" in r] == list(range(1, 21))
    # in step again: nothing more is sent
    assert CellLogger(jsonl, store, run_id).last_step("train/loss") == 20
    assert len(history(store, run_id)) == 20


def test_cell_logger_mlflow_ahead_of_a_lost_log(store, tmp_path):
    run_id, _ = new_cell(store)
    mlflow_only = MlflowRunLogger(store, run_id)
    mlflow_only.log_metrics({"train/loss": 0.3}, step=40)
    mlflow_only.flush()
    assert CellLogger(tmp_path / "metrics.jsonl", store, run_id).last_step("train/loss") == 40
    assert JsonlLogger(tmp_path / "other.jsonl").last_step("train/loss") is None


def test_system_metrics_logged_while_the_block_runs(store):
    run_id, _ = new_cell(store)
    with system_metrics(store, run_id, interval_s=0.2) as monitor:
        assert monitor is not None
        time.sleep(1.5)
    keys = client(store).get_run(run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)


def test_system_metrics_without_psutil_is_a_no_op(store, monkeypatch):
    run_id, _ = new_cell(store)
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    with system_metrics(store, run_id, interval_s=0.2) as monitor:
        assert monitor is None
    assert not any(k.startswith("system/") for k in client(store).get_run(run_id).data.metrics)


def test_cell_artifacts(store, tmp_path):
    run_id, cfg = new_cell(store)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = JsonlLogger(run_dir / "metrics.jsonl")
    for step in range(1, 21):
        log.log_metrics({"train/loss": 2 / step}, step=step)
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    log_cell_artifacts(store, run_id, cfg=cfg, run_dir=run_dir, checkpoint=checkpoint)
    log_summary_metrics(store, run_id, {"linear_top1": 51.5, "device_hours": 0.25}, step=20)
    mlflow_client = client(store)
    names = {f.path for f in mlflow_client.list_artifacts(run_id)} | {
        f.path for f in mlflow_client.list_artifacts(run_id, "figures")}
    assert {"config.yaml", "checkpoint_path.txt", "figures/loss_curve.png"} <= names
    assert "checkpoints" not in names  # the checkpoint itself only when asked
    log_cell_artifacts(store, run_id, checkpoint=checkpoint, log_checkpoint=True, loss_figure=False)
    assert [f.path for f in mlflow_client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/latest.pt"]
    local = Path(mlflow_client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert RunConfig.model_validate(__import__("yaml").safe_load(local.read_text())) == cfg
    run = mlflow_client.get_run(run_id)
    assert run.data.tags["checkpoint"] == str(checkpoint)
    assert run.data.metrics["linear_top1"] == 51.5
    png = Path(mlflow_client.download_artifacts(run_id, "figures/loss_curve.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the HTTP server -----------------------------------------------------------------------------

def test_server_round_trip_and_reuse(mlflow_server, tmp_path_factory):
    info = mlflow_server
    assert info.url.startswith("http://127.0.0.1:")
    check_store(info.url)
    state = Path(info.log_path).parent
    assert read_state(state).pid == info.pid
    again = ensure_server(info.store_uri, Path(info.artifact_root), state, host="127.0.0.1")
    assert again.reused and again.pid == info.pid and again.url == info.url

    run_id, cfg = new_cell(info.url, "http-unit", target="pixel")
    logger = MlflowRunLogger(info.url, run_id, flush_interval_s=None)
    for step in range(1, 301):
        logger.log_metrics({"train/loss": 1 / step}, step=step)
    logger.flush()
    assert logger.last_step("train/loss") == 300
    assert [s for s, _ in history(info.url, run_id)] == list(range(1, 301))
    run = client(info.url).get_run(run_id)
    assert decode_param(run.data.params["model.mask_ratio"]) == 0.75
    assert run.data.tags["axis.model.target"] == "pixel"
    log_cell_artifacts(info.url, run_id, cfg=cfg, loss_figure=True)
    assert {"config.yaml", "figures"} <= {f.path for f in client(info.url).list_artifacts(run_id)}
    mark_run(info.url, run_id, "done")
    assert client(info.url).get_run(run_id).info.status == "FINISHED"


def test_server_for_another_store_is_refused(mlflow_server, tmp_path):
    state = Path(mlflow_server.log_path).parent
    with pytest.raises(TrackingError, match="another store"):
        ensure_server(sqlite_uri(tmp_path / "other.db"), tmp_path / "art", state, host="127.0.0.1")


def test_stop_server_without_a_server(tmp_path):
    assert stop_server(tmp_path / "nothing") is False


def test_ensure_server_port_in_use(mlflow_server, tmp_path):
    with pytest.raises(TrackingError, match="in use"):
        ensure_server(sqlite_uri(tmp_path / "mlflow.db"), tmp_path / "art", tmp_path / "state",
                      host="127.0.0.1", port=mlflow_server.port)


# --- a real run, killed and resumed ------------------------------------------------------------

class KilledAt(Exception):
    pass


class DiesAfterStep(CellLogger):
    """A CellLogger whose job is killed right after logging ``step`` (before MLflow's flush)."""

    def __init__(self, *args, die_after: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.die_after = die_after

    def log_metrics(self, metrics, step=None) -> None:
        super().log_metrics(metrics, step)
        if step == self.die_after and "train/loss" in metrics:
            raise KilledAt(step)


@pytest.mark.slow
def test_pretraining_killed_and_resumed_logs_every_step_once(store, tmp_path):
    """The real loop (tiny ViT, demo images): checkpoints every 5 steps, killed after logging
    step 8 with MLflow's buffer unsent, resumed from the step-5 checkpoint: MLflow and the
    JSON-lines log both end with steps 1..10, each once."""
    from harness.data.demo import make_demo_dataset
    from harness.run import run

    make_demo_dataset(tmp_path / "data", image_size=32, train_per_class=8, val_per_class=2)
    cfg = RunConfig().with_overrides({
        "model.size": "vit_tiny_patch4", "model.img_size": 32, "model.target": "pixel",
        "model.decoder": "standard", "model.masking": "random", "data.root": str(tmp_path / "data"),
        "pretrain.epochs": 1, "pretrain.warmup_epochs": 0, "pretrain.batch_size": 8,
        "eval.protocols": [], "runtime.device": "cpu", "runtime.num_workers": 0,
        "runtime.log_every": 1, "runtime.checkpoint_every": 5})
    run_id, _ = new_cell(store)
    run_dir = tmp_path / "run"
    jsonl = run_dir / "metrics.jsonl"
    with pytest.raises(KilledAt):
        run(cfg, run_dir, DiesAfterStep(jsonl, store, run_id, flush_interval_s=None, die_after=8))
    assert [s for s, _ in history(store, run_id)] == [1, 2, 3, 4, 5]  # flushed at the checkpoint
    result = run(cfg, run_dir, CellLogger(jsonl, store, run_id, flush_interval_s=None))
    assert result.state == "done"
    steps = [s for s, _ in history(store, run_id)]
    assert steps == list(range(1, 11))
    assert [r["step"] for r in read_jsonl(jsonl) if "train/loss" in r] == list(range(1, 11))
    mlflow_loss = dict(history(store, run_id))
    local_loss = {r["step"]: r["train/loss"] for r in read_jsonl(jsonl) if "train/loss" in r}
    assert mlflow_loss == pytest.approx(local_loss)


def test_create_cell_runs_in_order_over_http(mlflow_server):
    uri = mlflow_server.url
    exp_id = prepare_store(uri, "bulk")
    parent = start_parent_run(uri, exp_id, grid="bulk", tags={}, axes=AXES)
    cells = []
    for seed in range(12):
        values = {"model.target": "clip", "model.mask_ratio": 0.5}
        cfg = RunConfig().with_overrides({**values, "seed": seed})
        cells.append({"run_name": run_name(values, seed), "params": cfg.flat(),
                      "tags": cell_tags(cfg, grid="bulk", axis_values=values, executor="slurm")})
    run_ids = create_cell_runs(uri, exp_id, parent_run_id=parent, cells=cells)
    assert len(set(run_ids)) == 12
    for seed, run_id in enumerate(run_ids):
        run = client(uri).get_run(run_id)
        assert run.data.tags["seed"] == str(seed) and run.data.params["seed"] == str(seed)
        assert run.data.tags["mlflow.parentRunId"] == parent


def test_stop_server_never_kills_a_process_that_reused_the_pid(tmp_path):
    import subprocess

    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        state = tmp_path / "state"
        state.mkdir()
        (state / "mlflow-server.json").write_text(json.dumps({
            "url": "http://127.0.0.1:1", "pid": other.pid, "port": 1, "host": "127.0.0.1",
            "store_uri": "sqlite:///x.db", "artifact_root": "", "log_path": "", "started_at": 0}))
        assert stop_server(state) is False
        assert other.poll() is None and not (state / "mlflow-server.json").exists()
    finally:
        other.kill()
        other.wait()
