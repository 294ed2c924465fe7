"""Where a grid's runs are: the MLflow store a report reads, and links into a running UI.
Only the standard library at module level."""

from __future__ import annotations

from pathlib import Path


def resolve_store(name: str, tracking_uri: str | None, runs_dir: Path) -> tuple[str, str, str | None]:
    """(tracking URI, experiment, note) for a report on grid ``name``: ``--tracking-uri``, else
    ``$MLFLOW_TRACKING_URI``, else the store ``ablate`` recorded in ``<runs>/<grid>/grid.json`` (through
    its server when that answers), else ``sqlite:///<cwd>/mlflow.db``."""
    import os

    from harness.core.files import read_json
    from harness.tracking.store import Store, default_tracking_uri

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return tracking_uri or default_tracking_uri(), name, None
    record = read_json(runs_dir / name / "grid.json")
    if not isinstance(record, dict) or not isinstance(record.get("store"), dict):
        return default_tracking_uri(), name, None
    store = Store(**record["store"])
    uri = store.reader_uri()
    down = store.server_dir and uri == store.backend
    note = f"the grid's MLflow server is not running: reading its store {store.backend} directly" if down else None
    return uri, record.get("experiment") or name, note


def experiment_links(uri: str, url: str, limit: int = 10) -> list[tuple[str, str]]:
    """(experiment, link to its cells) for the store's grids. ``workflowType=machine_learning`` opens the
    runs table, not MLflow 3's GenAI overview; ``viewStateShareKey`` the experiment's saved view of its
    cells (:func:`harness.tracking.store.prepare_store`)."""
    from harness.tracking.schema import UI_VIEW
    from harness.tracking.store import client

    try:
        experiments = client(uri).search_experiments(max_results=limit + 1, order_by=["last_update_time DESC"])
    except Exception:  # noqa: BLE001 - links are a convenience
        return []
    query = f"workflowType=machine_learning&viewStateShareKey={UI_VIEW}"
    return [(e.name, f"{url}/#/experiments/{e.experiment_id}/runs?{query}")
            for e in experiments if e.name != "Default"][:limit]
