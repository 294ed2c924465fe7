"""The tracking store: where it is, whether it answers, and preparing it before jobs start.

Two kinds of store are used:

* ``sqlite:///<abs path>/mlflow.db``: the default, embedded store (local runs log straight into
  it). A fresh SQLite store must get its schema once before several processes open it (they
  race on migration otherwise), hence :func:`prepare_store` before any worker starts.
* ``http(s)://host:port``: an ``mlflow server`` (see :mod:`harness.tracking.server`); jobs on a
  cluster log over HTTP to one server instead of sharing a database file.

Other SQLAlchemy URIs (postgresql://, mysql://) work through MLflow as they are.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from harness.files import read_json
from harness.tracking.schema import UI_VIEW, TrackingError

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlflow-artifacts"


STATE_FILE = "mlflow-server.json"  # what harness.tracking.server records about a running server


class Store(BaseModel):
    """Where a grid's runs live: the ``backend`` store itself (``sqlite:///...``, a database URI,
    or a server URL the user gave) and, when ``ablate`` serves it to Slurm jobs, the folder where
    that server records its address. A restarted server on any port is found again through it."""

    model_config = ConfigDict(frozen=True)
    backend: str
    server_dir: str | None = None

    def server_url(self) -> str | None:
        """The address of the server recorded for this store (it may be down)."""
        state = read_json(Path(self.server_dir) / STATE_FILE) if self.server_dir else None
        if isinstance(state, dict) and state.get("store_uri") == self.backend:
            return state.get("url")
        return None

    def writer_uri(self) -> str | None:
        """What a job logs to: the server when the store is served, else the store itself
        (None: served, but no server recorded; try again later)."""
        return self.server_url() if self.server_dir else self.backend

    def reader_uri(self) -> str:
        """What a reader uses: the server when it answers, else the store itself."""
        url = self.server_url()
        if url and server_answers(url):
            return url
        return self.backend


def server_answers(url: str, timeout_s: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return sqlite_uri(Path.cwd() / DB_NAME)


def sqlite_uri(path: str | os.PathLike) -> str:
    return "sqlite:///" + str(Path(path).resolve())


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores)."""
    if not uri.startswith("sqlite:"):
        return None
    match = re.match(r"^sqlite:///(?P<path>[^?]*)", uri)
    if not match or not match.group("path"):
        raise TrackingError(f"{uri!r} is not a SQLite file store: write sqlite:///path/to/mlflow.db")
    return Path(match.group("path")).absolute()


def default_artifact_root(uri: str) -> Path | None:
    """Artifacts of a SQLite store live beside it, in ``mlflow-artifacts/``."""
    path = sqlite_path(uri)
    return path.parent / ARTIFACTS_DIR if path else None


# --- reachability ----------------------------------------------------------------------------

def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's own client would send (token or basic auth from the env)."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _check_http(uri: str, timeout_s: float) -> None:
    import requests

    base = uri.rstrip("/")
    verify = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true"
    hint = "start it (e.g. `bench.py ui` or `mlflow server`) or pass another --tracking-uri"
    try:
        # /health is exempt from the server's host checks, so also make one API call: it fails
        # when the server rejects this host name (mlflow server --allowed-hosts).
        resp = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            headers=_auth_headers(), timeout=timeout_s, verify=verify)
    except requests.Timeout:
        raise TrackingError(f"MLflow server {base} did not answer within {timeout_s:g} s: {hint}") from None
    except requests.RequestException as err:
        reason = type(err).__name__
        if isinstance(err, requests.ConnectionError):
            reason = "connection refused or host unreachable"
        raise TrackingError(f"MLflow server {base} is not reachable ({reason}): {hint}") from None
    if resp.status_code in (401, 403):
        raise TrackingError(f"MLflow server {base} refused access (HTTP {resp.status_code}): set "
                            "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD")
    if resp.status_code == 400 and "host" in resp.text.lower():
        raise TrackingError(f"MLflow server {base} rejects the host name in this URL: start it with "
                            "--allowed-hosts including it, or use an address it allows")
    if resp.status_code != 200:
        raise TrackingError(f"{base} answered HTTP {resp.status_code} to an MLflow API call: is it an "
                            f"MLflow tracking server? Pass the server's base URL as --tracking-uri")


def _check_sqlite(path: Path, must_exist: bool) -> None:
    if path.is_dir():
        raise TrackingError(f"SQLite store {path} is a directory: give the database file, "
                            f"e.g. sqlite:///{path / DB_NAME}")
    if not path.exists():
        if must_exist:
            raise TrackingError(f"no MLflow store at {path}: run `bench.py ablate` first, or pass "
                                "--tracking-uri of the store that holds the runs")
        parent = path.parent
        if not parent.is_dir():
            raise TrackingError(f"cannot create the SQLite store {path}: folder {parent} does not "
                                "exist; create it or choose another --tracking-uri")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise TrackingError(f"cannot create the SQLite store {path}: folder {parent} is not "
                                "writable; choose another --tracking-uri")
        return
    if not os.access(path, os.R_OK):
        raise TrackingError(f"SQLite store {path} is not readable: fix its permissions")
    if path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise TrackingError(f"{path} is not a SQLite database: give the path of an MLflow store")
    if not must_exist and not os.access(path, os.W_OK):
        raise TrackingError(f"SQLite store {path} is read-only: fix its permissions")


def _check_other(uri: str, timeout_s: float) -> None:
    """Any other MLflow store URI: one search call, abandoned after ``timeout_s``."""
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"{uri!r}: MLflow 3 has deprecated file stores; use "
                            "sqlite:///path/to/mlflow.db or an http:// server")
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            client(uri).search_experiments(max_results=1)
            outcome["error"] = None
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome["error"] = err

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise TrackingError(f"tracking store {uri} did not answer within {timeout_s:g} s: check it "
                            "or pass another --tracking-uri")
    if outcome["error"] is not None:
        first = str(outcome["error"]).strip().splitlines()[0] if str(outcome["error"]).strip() else ""
        raise TrackingError(f"tracking store {uri} cannot be used ({type(outcome['error']).__name__}: "
                            f"{first[:200]}): check it or pass another --tracking-uri")


def check_store(uri: str, timeout_s: float = 5, *, must_exist: bool = False) -> None:
    """Raise :class:`TrackingError` quickly (about ``timeout_s`` at most) unless ``uri`` is usable.

    HTTP: one API call with a timeout (no retries). SQLite: the file (or its folder) is there
    and accessible; with ``must_exist`` the file must already exist (readers: a report must
    not create an empty store).
    """
    if is_http(uri):
        _check_http(uri, timeout_s)
    elif (path := sqlite_path(uri)) is not None:
        _check_sqlite(path, must_exist)
    else:
        _check_other(uri, timeout_s)


@contextlib.contextmanager
def bounded_http(retries: int = 1, timeout_s: float = 30) -> Iterator[None]:
    """Within the block, MLflow's HTTP client gives up after ``retries`` retries and
    ``timeout_s`` per request (its default retries for minutes). For commands a person waits
    on; jobs keep MLflow's patient default so a server restart loses nothing."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s))),
             "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- clients and experiments -----------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def client(uri: str) -> Any:
    """One cached ``MlflowClient`` per URI (a SQLite store opens its engine once per process)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_schema(uri: str) -> None:
    """Create or migrate a SQLite store's schema now, in this one process."""
    check_store(uri)
    client(uri).search_experiments(max_results=1)


def prepare_store(uri: str, experiment: str, *, artifact_root: str | os.PathLike | None = None) -> str:
    """Create the store's schema and the experiment once, before any worker starts.

    Idempotent (and safe against a concurrent call); a deleted experiment of that name is
    restored. A new experiment in a SQLite store keeps its artifacts in
    ``<artifact_root or mlflow-artifacts/ beside the database>/<experiment>`` (a plain path,
    usable both from local jobs and through a server started on that store); through an
    HTTP server, the server picks the location. Returns the experiment id.

    The experiment (new or existing) also gets two tags for MLflow 3's UI:
    ``mlflow.experimentKind=custom_model_development`` (a model-training experiment: UIs that read
    it open on the runs table, not the GenAI overview; 3.17's follows its own GenAI / Model
    training switch instead, which the link parameter ``workflowType=machine_learning`` sets), and
    a saved view of the runs table, ``mlflow.sharedViewState.grid-cells``, opened by the link
    parameter ``viewStateShareKey=grid-cells``: the cell runs only, unfolded (the table folds child
    runs under their parent only when sorted by start time), sorted by name (their axis values),
    with the headline metrics and the state as columns.
    """
    import json

    from mlflow.exceptions import MlflowException

    from harness.grid import HEADLINE_METRICS

    run_name = "attributes.`Run Name`"
    columns = [*(f"metrics.`{m}`" for m in HEADLINE_METRICS), "tags.`status`"]
    ui_tags = {
        "mlflow.experimentKind": "custom_model_development",
        f"mlflow.sharedViewState.{UI_VIEW}": json.dumps({
            "searchFilter": "tags.role = 'cell'", "orderByKey": "tags.`mlflow.runName`", "orderByAsc": True,
            "selectedColumns": columns, "columnOrder": [run_name, *columns], "columnWidths": {run_name: 380}}),
    }
    init_schema(uri)
    mlflow_client = client(uri)
    experiment_obj = mlflow_client.get_experiment_by_name(experiment)
    if experiment_obj is None:
        location = None
        root = Path(artifact_root) if artifact_root else default_artifact_root(uri)
        if root is not None and not is_http(uri):
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
            location = str((root / safe).absolute())
        try:
            return mlflow_client.create_experiment(experiment, artifact_location=location, tags=ui_tags)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment_obj = mlflow_client.get_experiment_by_name(experiment)
    if experiment_obj.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment_obj.experiment_id)
    for key, value in ui_tags.items():
        if experiment_obj.tags.get(key) != value:
            mlflow_client.set_experiment_tag(experiment_obj.experiment_id, key, value)
    return experiment_obj.experiment_id


def find_experiment(uri: str, name_or_id: str) -> Any:
    """The active experiment called ``name_or_id`` (or with that id); TrackingError listing
    the experiments that exist otherwise."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(name_or_id)
    if found is None and name_or_id.isdigit():
        with contextlib.suppress(MlflowException):
            found = mlflow_client.get_experiment(name_or_id)
    if found is not None and found.lifecycle_stage == "active":
        return found
    names = sorted(e.name for e in mlflow_client.search_experiments(max_results=1000)
                   if e.name != "Default")
    listed = ", ".join(names) if names else "none (run `bench.py ablate` first)"
    raise TrackingError(f"no grid or experiment {name_or_id!r} in {display_uri(uri)}; experiments: {listed}")


def display_uri(uri: str) -> str:
    """A URI for messages: credentials removed."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        return uri.replace(f"{parsed.username}:{parsed.password}@", "").replace(f"{parsed.username}@", "")
    return uri
