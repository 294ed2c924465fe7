"""Nothing is lost under concurrency: 8 processes mirror their run folders at once into their own
child runs of one prepared store, over HTTP (as jobs on a cluster do) and straight into SQLite
(local jobs); afterwards every step of every run is there exactly once."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from harness.run.cell_state import CellState
from harness.config import RunConfig
from harness.tracking.runs import create_cell_runs, start_parent_run
from harness.tracking.schema import cell_tags
from harness.tracking.store import client, prepare_store, sqlite_uri

N_PROCESSES = 8
STEPS = 200
FLUSH_EVERY = 20  # steps between flushes, as a run logs a window of steps at a time

_barrier = None


def _init(barrier) -> None:
    """Worker start-up: import MLflow now, so the logging itself starts together."""
    global _barrier
    _barrier = barrier
    import mlflow.tracking  # noqa: F401

    import harness.tracking.sync  # noqa: F401


def _log_run(task: tuple[str, str, str]) -> tuple[str, int | None, float, float]:
    from pathlib import Path

    from harness.run.folder import write_status
    from harness.tracking.store import client
    from harness.tracking.sync import backlog, sync_run
    from harness.train.metrics_log import JsonlLogger

    uri, run_id, folder = task
    logger = JsonlLogger(Path(folder) / "metrics.jsonl")
    client(uri).get_run(run_id)  # opens the store (engine / HTTP session) before the start
    _barrier.wait(timeout=120)
    start = time.time()
    for step in range(1, STEPS + 1):
        logger.log_metrics({"train/loss": 1.0 / step, "train/lr": step * 1e-5}, step=step)
        if step % FLUSH_EVERY == 0:
            logger.flush()
            sync_run(Path(folder), uri, run_id)
    (Path(folder) / "results.json").write_text('{"metrics": {"final_loss": 0.005}, "steps": %d}' % STEPS)
    write_status(Path(folder), CellState.DONE)
    sync_run(Path(folder), uri, run_id)
    return run_id, STEPS if not backlog(Path(folder)) else None, start, time.time()


@pytest.fixture(scope="module")
def pool():
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(N_PROCESSES, initializer=_init, initargs=(ctx.Barrier(N_PROCESSES),)) as workers:
        yield workers


def make_runs(uri: str, experiment: str) -> list[str]:
    exp_id = prepare_store(uri, experiment)
    parent = start_parent_run(uri, exp_id, grid=experiment, tags={}, axes=[
        {"name": "seed", "values": list(range(N_PROCESSES)), "baseline": 0}])
    cells = [{"run_name": f"baseline seed={seed}", "params": RunConfig(seed=seed).flat(),
              "tags": cell_tags(RunConfig(seed=seed), grid=experiment, cell="baseline", axis_values={},
                                executor="test")} for seed in range(N_PROCESSES)]
    return create_cell_runs(uri, exp_id, parent_run_id=parent, cells=cells)


def check_every_step_once(uri: str, run_ids: list[str], results) -> None:
    assert {r[0] for r in results} == set(run_ids)
    assert all(r[1] == STEPS for r in results), results
    mlflow_client = client(uri)
    for run_id in run_ids:
        for key, value in (("train/loss", lambda s: 1.0 / s), ("train/lr", lambda s: s * 1e-5)):
            points = sorted((m.step, m.value) for m in mlflow_client.get_metric_history(run_id, key))
            steps = [s for s, _ in points]
            assert steps == list(range(1, STEPS + 1)), f"{run_id} {key}: {len(steps)} points"
            assert all(v == pytest.approx(value(s)) for s, v in points)
        run = mlflow_client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "done"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["http", "sqlite"])
def test_eight_processes_lose_nothing(backend, pool, mlflow_server, tmp_path):
    uri = mlflow_server.url if backend == "http" else sqlite_uri(tmp_path / "mlflow.db")
    run_ids = make_runs(uri, f"concurrency-{backend}")
    folders = [tmp_path / f"cell{i}" for i in range(N_PROCESSES)]
    for folder in folders:
        folder.mkdir()
    results = pool.map(_log_run, [(uri, run_id, str(f)) for run_id, f in zip(run_ids, folders)], chunksize=1)
    check_every_step_once(uri, run_ids, results)
    wall = max(r[3] for r in results) - min(r[2] for r in results)  # first start to last end
    writes = N_PROCESSES * STEPS * 2
    print(f"\n{backend}: {N_PROCESSES} processes x {STEPS} steps x 2 metrics = {writes} metric writes "
          f"in {N_PROCESSES * STEPS // FLUSH_EVERY} batches, all done in {wall:.2f} s ({writes / wall:.0f}/s)")
