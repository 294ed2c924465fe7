"""Where a grid's runs are: the store a grid records (and the server that serves it to Slurm jobs),
the store a report reads, and links into a running MLflow UI."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from harness.core.files import read_json
from harness.tracking.server import read_state, server_answers
from harness.tracking.store import client, default_tracking_uri


class Store(BaseModel):
    """Where a grid's runs live: the ``backend`` store (``sqlite:///...``, a database URI or a server URL
    the user gave) and, when ``ablate`` serves it to Slurm jobs, the folder where its server records its
    address (a restarted server on any port is found again through it)."""

    model_config = ConfigDict(frozen=True)
    backend: str
    server_dir: str | None = None

    def server_url(self) -> str | None:
        """The address of the server recorded for this store (it may be down)."""
        info = read_state(self.server_dir) if self.server_dir else None
        return info.url if info is not None and info.store_uri == self.backend else None

    def writer_uri(self) -> str | None:
        """What a job logs to: the server when the store is served (None: no server recorded yet), else
        the store itself."""
        return self.server_url() if self.server_dir else self.backend

    def reader_uri(self) -> str:
        """What a reader uses: the server when it answers, else the store itself."""
        url = self.server_url()
        return url if url and server_answers(url) else self.backend


def resolve_store(name: str, tracking_uri: str | None, runs_dir: Path) -> tuple[str, str, str | None]:
    """(tracking URI, experiment, note) for a report on grid ``name``: ``--tracking-uri``, else
    ``$MLFLOW_TRACKING_URI``, else the store ``ablate`` recorded in ``<runs>/<grid>/grid.json`` (through
    its server when that answers), else ``sqlite:///<cwd>/mlflow.db``."""
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
    """(experiment, link to its page in the UI at ``url``) for the store's newest grids: the UI's
    experiment route, as MLflow's documentation links it."""
    try:
        experiments = client(uri).search_experiments(max_results=limit + 1, order_by=["last_update_time DESC"])
    except Exception:  # noqa: BLE001 - links are a convenience
        return []
    return [(e.name, f"{url}/#/experiments/{e.experiment_id}") for e in experiments if e.name != "Default"][:limit]
