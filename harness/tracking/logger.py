"""Logging a running cell to its MLflow run: metrics (batched), artifacts, system metrics.

:class:`MlflowRunLogger` implements :class:`~harness.train.metrics_log.RunLogger` for an
existing run, given only the tracking URI and the run id (so a job on another host builds
one cheaply; it also pickles). Metrics are buffered and sent with ``log_batch``, at most 1000
per request: single ``log_metric`` calls manage about 115 writes/s on a SQLite store.

:class:`CellLogger` keeps the run folder's ``metrics.jsonl`` and the MLflow run in step:
when a kill left MLflow behind the JSON-lines log (its buffer was not flushed), the missing
steps are sent from the log on resume, so neither destination has a gap or a repeat.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from harness.tracking.schema import TrackingError
from harness.tracking.store import client, display_uri

log = logging.getLogger(__name__)

BATCH_SIZE = 1000  # MLflow's maximum metrics per log_batch


class MlflowRunLogger:
    """Buffered metric logger for an existing MLflow run.

    ``log_metrics`` only appends; ``flush`` sends the buffer in ``log_batch`` requests of at
    most 1000 metrics. A buffer older than ``flush_interval_s`` (or full) is also sent from
    ``log_metrics``, so the UI follows a long run between checkpoints. When sending fails,
    the unsent metrics stay in the buffer for the next flush and :class:`TrackingError` is
    raised.
    """

    def __init__(self, uri: str, run_id: str, *, flush_interval_s: float | None = 15.0,
                 max_buffer: int = 100_000) -> None:
        self.uri = uri
        self.run_id = run_id
        self.flush_interval_s = flush_interval_s
        self.max_buffer = max_buffer
        self._pending: list[Any] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()

    # pickling: a job receives (uri, run_id, settings); buffer and lock stay behind
    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "flush_interval_s": self.flush_interval_s,
                "max_buffer": self.max_buffer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["run_id"], flush_interval_s=state["flush_interval_s"],
                      max_buffer=state["max_buffer"])

    def __repr__(self) -> str:
        return f"MlflowRunLogger({display_uri(self.uri)!r}, {self.run_id!r})"

    @property
    def client(self) -> Any:
        return client(self.uri)

    # --- RunLogger ---------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(step or 0)
        with self._lock:
            self._pending.extend(Metric(str(k), float(v), now, step) for k, v in metrics.items())
            due = len(self._pending) >= BATCH_SIZE or (
                self.flush_interval_s is not None
                and time.monotonic() - self._last_flush >= self.flush_interval_s)
        if due:
            try:
                self.flush()
            except TrackingError as err:
                if len(self._pending) > self.max_buffer:
                    raise
                log.warning("%s (kept %d metrics for the next flush)", err, len(self._pending))

    def flush(self) -> None:
        with self._lock:
            self._last_flush = time.monotonic()
            while self._pending:
                chunk = self._pending[:BATCH_SIZE]
                try:
                    self.client.log_batch(self.run_id, metrics=chunk)
                except Exception as err:  # MlflowException, requests errors after MLflow's retries
                    raise TrackingError(f"could not log {len(self._pending)} metrics to MLflow run "
                                        f"{self.run_id} at {display_uri(self.uri)}: {_first_line(err)}") from err
                del self._pending[:len(chunk)]

    def last_step(self, key: str) -> int | None:
        """Highest step logged for ``key``: in the store, or still in this buffer."""
        with self._lock:
            pending = [m.step for m in self._pending if m.key == key]
        stored = self.stored_last_step(key)
        return max([*pending, *([] if stored is None else [stored])], default=None)

    def stored_last_step(self, key: str) -> int | None:
        """Highest step of ``key`` in the store. MLflow keeps, per key, the point with the
        largest (step, timestamp, value) as the run's latest metric, so one ``get_run`` gives
        the exact maximum step (no need to read a long history)."""
        run = self.client.get_run(self.run_id)
        objs = getattr(run.data, "_metric_objs", None)
        if objs is None:  # pragma: no cover - older MLflow: read the history
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            return max(steps, default=None)
        steps = [m.step for m in objs if m.key == key]
        return max(steps, default=None)

    # --- more than metrics ---------------------------------------------------------------------
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, os.fspath(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from harness.tracking.runs import set_run_tags

        set_run_tags(self.uri, self.run_id, tags)


class CellLogger:
    """A run folder's ``metrics.jsonl`` plus its MLflow run, kept consistent across resumes.

    ``last_step`` first sends MLflow any steps the JSON-lines log has beyond MLflow's last
    one (a kill between two flushes), then answers for both. Pass it as ``run(cfg, run_dir,
    logger=CellLogger(run_dir / "metrics.jsonl", uri, run_id))``.
    """

    def __init__(self, jsonl_path: str | os.PathLike, uri: str, run_id: str, **mlflow_kwargs: Any) -> None:
        from harness.train.metrics_log import JsonlLogger

        self.jsonl_path = Path(jsonl_path)
        self.local = JsonlLogger(self.jsonl_path)
        self.mlflow = MlflowRunLogger(uri, run_id, **mlflow_kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.local.log_metrics(metrics, step)
        self.mlflow.log_metrics(metrics, step)

    def flush(self) -> None:
        self.local.flush()
        self.mlflow.flush()

    def last_step(self, key: str) -> int | None:
        from harness.train.metrics_log import read_jsonl

        self.local.flush()
        local = self.local.last_step(key)
        remote = self.mlflow.last_step(key)
        if local is not None and (remote is None or local > remote):
            after = remote if remote is not None else -math.inf
            missing = [r for r in read_jsonl(self.jsonl_path)
                       if r.get("step") is not None and r["step"] > after]
            for record in missing:
                self.mlflow.log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
            self.mlflow.flush()
            log.info("sent %d logged steps that MLflow run %s was missing", len(missing), self.mlflow.run_id)
            return local
        return remote if local is None else max(local, remote if remote is not None else local)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.mlflow.log_artifact(path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.mlflow.log_text(text, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.mlflow.set_tags(tags)


@contextlib.contextmanager
def system_metrics(uri: str, run_id: str, *, interval_s: float = 10.0,
                   node_id: str | None = None) -> Iterator[Any]:
    """MLflow system metrics (CPU, memory, disk, network; GPUs through NVML) for the run while
    the block runs, as ``system/*`` metrics. Yields the monitor, or None where psutil (or
    MLflow's monitor) is missing or fails to start: never breaks the job.

    Use it around ``run()`` on one process per node (``node_id`` names the node when a cell
    spans several). Continues the step count of a requeued run. Monitoring stops by itself
    once the run is no longer RUNNING.
    """
    monitor = None
    try:
        import psutil  # noqa: F401 - MLflow's CPU monitor needs it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, samples_before_logging=1,
                                       resume_logging=True, node_id=node_id, tracking_uri=uri)
        monitor.start()
    except ImportError as err:
        log.info("no system metrics for run %s: %s", run_id, err)
        monitor = None
    except Exception as err:  # noqa: BLE001 - monitoring is optional
        log.warning("system metrics for run %s failed to start: %s", run_id, err)
        monitor = None
    try:
        yield monitor
    finally:
        if monitor is not None:
            with contextlib.suppress(Exception):
                monitor.finish()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]
