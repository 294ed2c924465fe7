"""Nothing is lost under concurrency: 8 processes log at once to their own child runs of
one prepared store, over HTTP (as jobs on a cluster do) and straight into SQLite (local
jobs); afterwards every step of every run is there exactly once."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from harness.config import RunConfig
from harness.tracking import (
    cell_tags,
    client,
    create_cell_run,
    mark_run,
    prepare_store,
    run_name,
    sqlite_uri,
    start_parent_run,
)

N_PROCESSES = 8
STEPS = 200
FLUSH_EVERY = 20  # steps between flushes, as a run logs a window of steps at a time

_barrier = None


def _init(barrier) -> None:
    """Worker start-up: import MLflow now, so the logging itself starts together."""
    global _barrier
    _barrier = barrier
    import mlflow.tracking  # noqa: F401

    import harness.tracking.logger  # noqa: F401


def _log_run(task: tuple[str, str]) -> tuple[str, int | None, float, float]:
    from harness.tracking import MlflowRunLogger

    uri, run_id = task
    logger = MlflowRunLogger(uri, run_id, flush_interval_s=None)
    logger.last_step("train/loss")  # opens the store (engine / HTTP session) before the start
    _barrier.wait(timeout=120)
    start = time.time()
    for step in range(1, STEPS + 1):
        logger.log_metrics({"train/loss": 1.0 / step, "train/lr": step * 1e-5}, step=step)
        if step % FLUSH_EVERY == 0:
            logger.flush()
    logger.flush()
    mark_run(uri, run_id, "done")
    return run_id, logger.last_step("train/loss"), start, time.time()


@pytest.fixture(scope="module")
def pool():
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(N_PROCESSES, initializer=_init, initargs=(ctx.Barrier(N_PROCESSES),)) as workers:
        yield workers


def make_runs(uri: str, experiment: str) -> list[str]:
    exp_id = prepare_store(uri, experiment)
    parent = start_parent_run(uri, exp_id, grid=experiment, tags={}, axes=[
        {"name": "seed", "values": list(range(N_PROCESSES)), "baseline": 0}])
    ids = []
    for seed in range(N_PROCESSES):
        cfg = RunConfig(seed=seed)
        ids.append(create_cell_run(uri, exp_id, parent_run_id=parent, run_name=run_name({}, seed),
                                   params=cfg.flat(),
                                   tags=cell_tags(cfg, grid=experiment, axis_values={}, executor="test")))
    return ids


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
    results = pool.map(_log_run, [(uri, run_id) for run_id in run_ids], chunksize=1)
    check_every_step_once(uri, run_ids, results)
    wall = max(r[3] for r in results) - min(r[2] for r in results)  # first start to last end
    writes = N_PROCESSES * STEPS * 2
    print(f"\n{backend}: {N_PROCESSES} processes x {STEPS} steps x 2 metrics = {writes} metric writes "
          f"in {N_PROCESSES * STEPS // FLUSH_EVERY} batches, all done in {wall:.2f} s ({writes / wall:.0f}/s)")
