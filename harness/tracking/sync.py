"""Mirroring a run folder into its MLflow run: the folder is the truth, MLflow a copy of it.

:func:`sync_run` brings the run up to date with the folder, safe to repeat and to interrupt: the lines
of ``metrics.jsonl`` past the offset in ``mlflow-sync.json`` go out in ``log_batch`` requests and the
offset moves after each, so every step reaches MLflow exactly once; ``status.json`` becomes tags and
the MLflow run status; a done run adds its summary metrics (``results.json``), ``config.yaml`` and
``metrics.jsonl`` as artifacts, and the checkpoint's path.

A job runs a :class:`Mirror`, one thread that syncs its cells every few seconds: training never waits
on the tracking server nor stops when it is down; the steps wait in the folder until it is back. What still
waits is :func:`backlog` (``status`` shows it); ``ablate`` syncs the cells whose jobs ended with one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.run.cell_state import CellState
from harness.core.files import read_json, write_json_atomic
from harness.run.folder import CONFIG_FILE, METRICS_FILE, read_results, read_status
from harness.tracking import schema as S

log = logging.getLogger(__name__)

SYNC_FILE = "mlflow-sync.json"
BATCH_METRICS = 1000  # MLflow's limit per log_batch
NOT_METRICS = ("step", "time")  # keys of a metrics.jsonl line that are not metrics
# status.json field -> tag of the cell run
STATUS_TAGS = {"stage": "stage", "step": "step", "attempts": "attempts", "host": S.HOST, "job": S.SLURM_JOB_ID,
               "restarts": S.SLURM_RESTART_COUNT, "group_size": S.GROUP_SIZE}


def _read_sync(run_dir: Path) -> dict[str, Any]:
    data = read_json(run_dir / SYNC_FILE)
    return data if isinstance(data, dict) else {}


def _state_key(status: dict[str, Any]) -> list[Any]:
    return [status.get(k) for k in ("state", "reason", *STATUS_TAGS)]


def backlog(run_dir: Path, *, live: bool = False) -> str:
    """What the MLflow run lacks of the folder, in words ("" when it is in step). For a ``live`` job,
    whose mirror sends every few seconds, only while its last sync failed (the store is unreachable)."""
    run_dir = Path(run_dir)
    sync, status = _read_sync(run_dir), read_status(run_dir)
    if live and not sync.get("unreachable"):
        return ""
    waiting = []
    try:
        unsent = (run_dir / METRICS_FILE).stat().st_size - sync.get("offset", 0)
    except OSError:
        unsent = 0
    if unsent > 0:
        waiting.append(f"{unsent:,} bytes of metrics")
    if status and sync.get("state") != _state_key(status):
        waiting.append(f"state {status.get('state')}")
    if status.get("state") == CellState.DONE and not sync.get("final"):
        waiting.append("results")
    return ", ".join(waiting)


def _send_metrics(mlflow_client: Any, run_id: str, run_dir: Path, sync: dict[str, Any]) -> None:
    """Send the complete lines of ``metrics.jsonl`` past the recorded offset; a line torn by a kill
    (not JSON) is skipped, a line still being written (no newline yet) is left for later."""
    from mlflow.entities import Metric

    path, end = run_dir / METRICS_FILE, sync.get("offset", 0)
    try:
        if path.stat().st_size < end:  # a resumed run rewrote its log (a line torn by a kill): go on from its end
            end = path.stat().st_size
        with path.open("rb") as f:
            f.seek(end)
            lines = f.read().splitlines(keepends=True)
        fallback_ms = int(path.stat().st_mtime * 1000)
    except OSError:
        return
    batch: list[Metric] = []

    def send() -> None:
        if batch:
            mlflow_client.log_batch(run_id, metrics=batch)
            batch.clear()
        sync["offset"] = end
        write_json_atomic(run_dir / SYNC_FILE, sync)

    for line in lines:
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            step = int(record.get("step") or 0)
            stamp = int(float(record["time"]) * 1000) if "time" in record else fallback_ms
            metrics = [Metric(k, float(v), stamp, step) for k, v in record.items()
                       if k not in NOT_METRICS and isinstance(v, (int, float))]
            if len(batch) + len(metrics) > BATCH_METRICS:
                send()
            batch.extend(metrics)
        end += len(line)
    if end != sync.get("offset", 0):
        send()
def sync_run(run_dir: Path, uri: str, run_id: str) -> None:
    """Bring MLflow run ``run_id`` at ``uri`` up to date with ``run_dir`` (raises when the store
    cannot be reached; what was sent before the error stays sent and recorded)."""
    from harness.tracking.runs import set_run_tags, set_state
    from harness.tracking.store import client

    run_dir = Path(run_dir)
    mlflow_client = client(uri)
    sync = _read_sync(run_dir)
    _send_metrics(mlflow_client, run_id, run_dir, sync)
    status = read_status(run_dir)
    state = CellState.parse(status.get("state"))
    if state is not None and sync.get("state") != _state_key(status):
        tags = {tag: status[field] for field, tag in STATUS_TAGS.items() if status.get(field) is not None}
        set_state(uri, run_id, state, status.get("reason"), tags=tags)
        sync["state"] = _state_key(status)
        write_json_atomic(run_dir / SYNC_FILE, sync)
    if state == CellState.DONE and not sync.get("final") and (results := read_results(run_dir)) is not None:
        from mlflow.entities import Metric

        stamp = int((run_dir / "results.json").stat().st_mtime * 1000)
        step = int(results.get("steps", 0))
        mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step)
                                                 for k, v in results["metrics"].items() if v is not None])
        for name in (CONFIG_FILE, METRICS_FILE):
            if (run_dir / name).is_file():
                mlflow_client.log_artifact(run_id, os.fspath(run_dir / name))
        if results.get("checkpoint"):
            set_run_tags(uri, run_id, {S.CHECKPOINT: str(Path(results["checkpoint"]).absolute())})
        sync["final"] = True
        write_json_atomic(run_dir / SYNC_FILE, sync)


class Mirror:
    """Syncs run folders into their MLflow runs from one background thread while a job runs (one
    thread for all of a group job's cells: MLflow's lazy imports are not thread-safe, and mirrors
    importing it at once from several threads failed with "partially initialized module").
    ``uri`` is asked anew before every round (a restarted server may have moved); a failed sync
    is logged once per outage of each run and retried on the next round; :meth:`close` makes a
    last attempt and says whether every run is in step."""

    def __init__(self, runs: Sequence[tuple[Path, str]], uri: Callable[[], str | None],
                 interval_s: float = 10.0) -> None:
        self.runs = [(Path(run_dir), run_id) for run_dir, run_id in runs]
        self.uri, self.interval_s = uri, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-mirror", daemon=True)
        self._lock = threading.Lock()
        self._failing = {run_dir: False for run_dir, _ in self.runs}

    def __enter__(self) -> Mirror:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sync(self) -> bool:
        """One round over every run; True when all of them are in step."""
        with self._lock:
            return all([self._sync_run(run_dir, run_id) for run_dir, run_id in self.runs])

    def _sync_run(self, run_dir: Path, run_id: str) -> bool:
        try:
            if (uri := self.uri()) is None:
                raise ConnectionError("no tracking server is recorded for this store yet")
            sync_run(run_dir, uri, run_id)
        except Exception as err:  # noqa: BLE001 - the store is infrastructure: the run goes on
            if not self._failing[run_dir]:
                log.warning("MLflow is unreachable (%s); the run goes on and its metrics wait in %s",
                            (str(err).strip().splitlines() or [type(err).__name__])[0][:200],
                            run_dir / METRICS_FILE)
                self._set_failing(run_dir, True)
            return False
        if self._failing[run_dir]:
            log.info("MLflow is back: run %s is in step again", run_id)
            self._set_failing(run_dir, False)
        return True

    def _set_failing(self, run_dir: Path, failing: bool) -> None:
        # recorded for backlog(live=True): `status` shows a live job that cannot reach the store
        self._failing[run_dir] = failing
        write_json_atomic(run_dir / SYNC_FILE, {**_read_sync(run_dir), "unreachable": failing})

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sync()

    def close(self) -> bool:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.sync()
