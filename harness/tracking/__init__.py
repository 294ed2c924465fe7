"""The tracking boundary: the only package that talks to MLflow. The rest of the harness uses the
operations exported here (and the names in :mod:`.schema`):

- open a grid's store: :func:`check_store`, :func:`prepare_store`, :class:`Store`, and for Slurm jobs
  :func:`ensure_server` / :func:`stop_server` (:mod:`.store`, :mod:`.server`, :mod:`.locate`);
- mark runs: a parent run per ``ablate``, a child run per cell, their states (:mod:`.runs`);
- mirror a run folder into its run (:mod:`.sync`);
- read a grid's runs as one DataFrame: :func:`harness.tracking.read.load_runs` (imported from its module:
  it needs pandas, 0.3 s that ``bench.py status`` does not pay);
- locate the store a report reads and the UI (:mod:`.locate`, :func:`serve_ui`).

MLflow itself (about 1.6 s to import here) is imported inside the functions that call it, so that
``bench.py status`` and a job that tracks nothing never pay for it.
"""

import os

# MLflow's usage telemetry phones home from every client and server process; benchmark jobs on
# cluster nodes (and this project's machines) have no route out, so it could only time out.
# Set MLFLOW_DISABLE_TELEMETRY=false to opt back in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from harness.tracking import schema  # noqa: E402 - after the telemetry default
from harness.tracking.locate import Store, experiment_links, resolve_store  # noqa: E402
from harness.tracking.runs import (  # noqa: E402
    create_cell_runs,
    log_artifacts,
    per_run,
    run_state,
    set_run_tags,
    set_state,
    start_parent_run,
)
from harness.tracking.schema import TrackingError  # noqa: E402
from harness.tracking.server import (ensure_server, port_in_use, read_state, serve_ui, server_answers,  # noqa: E402
                                    stop_server)
from harness.tracking.store import (  # noqa: E402
    ARTIFACTS_DIR,
    DB_NAME,
    SERVER_DIR,
    bounded_http,
    check_store,
    default_tracking_uri,
    display_uri,
    experiment_exists,
    is_http,
    limit_http,
    prepare_store,
    sqlite_path,
    sqlite_uri,
    store_writes,
)
from harness.tracking.sync import Mirror, backlog, sync_run  # noqa: E402

__all__ = [
    "ARTIFACTS_DIR", "DB_NAME", "SERVER_DIR", "Mirror", "Store", "TrackingError", "backlog", "bounded_http", "check_store",
    "create_cell_runs", "default_tracking_uri", "display_uri", "ensure_server", "experiment_exists",
    "experiment_links", "is_http", "limit_http", "log_artifacts", "per_run", "port_in_use", "prepare_store",
    "read_state", "resolve_store", "run_state", "schema", "serve_ui", "server_answers", "set_run_tags", "set_state", "sqlite_path",
    "sqlite_uri", "start_parent_run", "stop_server", "store_writes", "sync_run",
]
