"""MLflow tracking for grids: the store, parent and cell runs, a run logger, the server.

Layout of what is written (experiments, runs, tags, params, metrics, artifacts):
:mod:`harness.tracking.schema`. Names are imported lazily, so ``import harness.tracking``
does not import MLflow (seconds) until a function that needs it is used.

Typical use by the launcher::

    uri = default_tracking_uri()                       # or ensure_server(...).url on Slurm
    check_store(uri)
    exp = prepare_store(uri, experiment_name(grid))    # once, before any job
    parent = start_parent_run(uri, exp, grid=grid, tags={...}, axes=[...])
    run_id = create_cell_run(uri, exp, parent_run_id=parent, run_name=run_name(values, seed),
                             params=cfg.flat(), tags=cell_tags(cfg, grid=grid, ...))

and by a job::

    mark_run(uri, run_id, "running"); set_run_tags(uri, run_id, job_tags())
    with system_metrics(uri, run_id):
        result = run(cfg, run_dir, logger=CellLogger(run_dir / "metrics.jsonl", uri, run_id))
    log_summary_metrics(uri, run_id, result.metrics, step=...)
    log_cell_artifacts(uri, run_id, cfg=cfg, run_dir=run_dir, checkpoint=...)
    mark_run(uri, run_id, result.state, result.failure_reason)
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# MLflow's usage telemetry phones home from every client and server process; benchmark jobs on
# cluster nodes (and this project's machines) have no route out, so it could only time out.
# Set MLFLOW_DISABLE_TELEMETRY=false to opt back in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from harness.tracking.schema import (  # light: no MLflow import
    TrackingError,
    cell_name,
    cell_tags,
    decode_param,
    encode_param,
    experiment_name,
    job_tags,
    run_name,
)

_LAZY: dict[str, str] = {
    # store
    "default_tracking_uri": "store", "check_store": "store", "prepare_store": "store",
    "bounded_http": "store", "find_experiment": "store", "sqlite_uri": "store",
    "sqlite_path": "store", "is_http": "store", "client": "store",
    # runs
    "start_parent_run": "runs", "finish_run": "runs", "create_cell_run": "runs",
    "create_cell_runs": "runs",
    "set_run_tags": "runs", "mark_run": "runs", "get_status": "runs",
    "log_summary_metrics": "runs", "log_cell_artifacts": "runs", "log_config": "runs",
    "log_checkpoint_path": "runs", "log_loss_figure": "runs", "log_files": "runs",
    # loggers
    "MlflowRunLogger": "logger", "CellLogger": "logger", "system_metrics": "logger",
    # server
    "ServerInfo": "server", "ensure_server": "server", "stop_server": "server",
    "read_state": "server", "serve_ui": "server",
}

__all__ = ["TrackingError", "cell_name", "cell_tags", "decode_param", "encode_param",
           "experiment_name", "job_tags", "run_name", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"harness.tracking.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness.tracking' has no attribute {name!r}")
