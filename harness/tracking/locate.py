"""Where a grid's runs are: the MLflow store a report reads, and links into a running UI.

Only the standard library at module level; MLflow and the server helpers are imported inside.
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import UserError


def resolve_store(name: str, tracking_uri: str | None, runs_dir: Path) -> tuple[str, str, str | None]:
    """(tracking URI, experiment, note) for a report on grid ``name``.

    ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the store that ``bench.py ablate``
    recorded in ``<runs>/<grid>/grid.json`` (for Slurm grids an MLflow server: when it no longer
    answers, its SQLite file is read directly), else ``sqlite:///<cwd>/mlflow.db``.
    """
    import json
    import os

    from harness.tracking.server import STATE_FILE, read_state
    from harness.tracking.store import check_store, default_tracking_uri, is_http, sqlite_path

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return tracking_uri or default_tracking_uri(), name, None
    try:
        record = json.loads((runs_dir / name / "grid.json").read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not record.get("tracking_uri"):
        return default_tracking_uri(), name, None
    uri, experiment = record["tracking_uri"], record.get("experiment") or name
    if not is_http(uri):
        return uri, experiment, None
    try:
        check_store(uri, timeout_s=3)
        return uri, experiment, None
    except UserError:
        for state_file in [*runs_dir.glob(f".*/{STATE_FILE}"), *runs_dir.glob(f"*/{STATE_FILE}")]:
            info = read_state(state_file.parent)
            if info is not None and info.url.rstrip("/") == uri.rstrip("/"):
                store = sqlite_path(info.store_uri) if info.store_uri.startswith("sqlite:") else None
                if store is not None and store.is_file():
                    return info.store_uri, experiment, (f"the grid's MLflow server {uri} is not running: "
                                                        f"reading its store {store} directly")
        raise


def experiment_links(uri: str, url: str, limit: int = 10) -> list[tuple[str, str]]:
    """(experiment, link to its runs table) for the store's grids. MLflow 3's UI opens an
    experiment on its GenAI overview; ``workflowType=machine_learning`` shows the runs."""
    try:
        from harness.tracking.store import client

        experiments = client(uri).search_experiments(max_results=limit + 1, order_by=["last_update_time DESC"])
    except Exception:  # noqa: BLE001 - links are a convenience
        return []
    return [(e.name, f"{url}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
            for e in experiments if e.name != "Default"][:limit]
