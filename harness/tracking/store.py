"""The tracking store: where it is, whether it answers, clients, preparing it before jobs start.

* ``sqlite:///<abs path>/mlflow.db``, the default: local runs log straight into it. A fresh store must
  get its schema once before several processes open it (they race on migration otherwise), hence
  :func:`prepare_store` before any worker starts.
* ``http(s)://host:port``, an ``mlflow server`` (:mod:`harness.tracking.server`): jobs on a cluster log
  to one server instead of sharing a database file.
* Other SQLAlchemy URIs (postgresql://, mysql://) work through MLflow as they are.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.tracking.schema import TrackingError

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlflow-artifacts"
SERVER_DIR = ".mlflow-server"  # under a runs folder: the Slurm grids' MLflow server records itself here


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "").strip() or sqlite_uri(Path.cwd() / DB_NAME)


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

def _check_http(uri: str, timeout_s: float) -> None:
    import requests

    base, env = uri.rstrip("/"), os.environ.get
    hint = "start it (e.g. `bench.py ui` or `mlflow server`) or pass another --tracking-uri"
    token, user, password = (env(f"MLFLOW_TRACKING_{name}") for name in ("TOKEN", "USERNAME", "PASSWORD"))
    try:
        # /health is exempt from the server's host checks, so make an API call: it fails when the
        # server rejects this host name (mlflow server --allowed-hosts). Credentials as MLflow sends them.
        resp = requests.get(f"{base}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                            headers={"Authorization": f"Bearer {token}"} if token else None,
                            auth=(user, password) if user and password and not token else None,
                            verify=env("MLFLOW_TRACKING_INSECURE_TLS", "").lower() != "true", timeout=timeout_s)
    except requests.Timeout:
        raise TrackingError(f"MLflow server {base} did not answer within {timeout_s:g} s: {hint}") from None
    except requests.RequestException as err:
        refused = isinstance(err, requests.ConnectionError)
        reason = "connection refused or host unreachable" if refused else type(err).__name__
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
    if path.stat().st_size:
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise TrackingError(f"{path} is not a SQLite database: give the path of an MLflow store")
    tables = _sqlite_tables(path) if path.stat().st_size else set()
    if tables and not MLFLOW_TABLES <= tables:
        raise TrackingError(f"{path} is a database of another program (tables {', '.join(sorted(tables)[:5])}"
                            f"{', ...' if len(tables) > 5 else ''}), not an MLflow store: milan-bench writes no table "
                            "into it; give the path of an MLflow store, or a new file")
    if must_exist and not tables:
        raise TrackingError(f"{path} holds no MLflow store (it is empty): run `bench.py ablate` first, or pass "
                            "--tracking-uri of the store that holds the runs")
    if not must_exist and not os.access(path, os.W_OK):
        raise TrackingError(f"SQLite store {path} is read-only: fix its permissions")


# The tables that make a SQLite file an MLflow store (MLflow's schema has more; these are its core).
MLFLOW_TABLES = frozenset({"alembic_version", "experiments", "runs", "metrics", "params", "tags"})


def _sqlite_tables(path: Path) -> set[str]:
    """The table names of a SQLite file, read through SQLAlchemy's inspector on a read-only
    connection: deciding whether a file is an MLflow store must not write to it (MLflow's own client
    creates its tables in any database it opens)."""
    from sqlalchemy import create_engine, inspect

    engine = create_engine(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        return set(inspect(engine).get_table_names())
    except Exception as err:  # noqa: BLE001 - a locked, torn or encrypted file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrackingError(f"SQLite store {path} cannot be read ({first[:160]}): check the file") from None
    finally:
        engine.dispose()


def _check_other(uri: str, timeout_s: float) -> None:
    """Any other MLflow store URI: one search call, abandoned after ``timeout_s``."""
    if uri.startswith("file:") or "://" not in uri:
        raise TrackingError(f"{uri!r}: MLflow 3 has deprecated file stores; use "
                            "sqlite:///path/to/mlflow.db or an http:// server")
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            client(uri).search_experiments(max_results=1)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - reported below
            outcome.append(err)

    thread = threading.Thread(target=probe, daemon=True)  # daemon: a hung probe must not hold up the exit
    thread.start()
    thread.join(timeout_s)
    if not outcome:
        raise TrackingError(f"tracking store {uri} did not answer within {timeout_s:g} s: check it "
                            "or pass another --tracking-uri")
    if (err := outcome[0]) is not None:
        first = (str(err).strip().splitlines() or [""])[0]
        raise TrackingError(f"tracking store {uri} cannot be used ({type(err).__name__}: {first[:200]}): "
                            "check it or pass another --tracking-uri")


def check_store(uri: str, timeout_s: float = 5, *, must_exist: bool = False) -> None:
    """Raise :class:`TrackingError` within about ``timeout_s`` unless ``uri`` is usable: a server or
    other store answers one call (no retries); a SQLite file is an MLflow store, or a new or empty file
    in a writable folder (never another program's database). With ``must_exist`` (``ui``, ``report``:
    readers create and migrate nothing) it must already be an MLflow store."""
    if is_http(uri):
        _check_http(uri, timeout_s)
    elif (path := sqlite_path(uri)) is not None:
        _check_sqlite(path, must_exist)
    else:
        _check_other(uri, timeout_s)


@contextlib.contextmanager
def store_writes(uri: str) -> Iterator[None]:
    """Writes to the store at ``uri``: SQLite's "database or disk is full" becomes one line naming it."""
    try:
        yield
    except Exception as err:
        if "disk is full" not in str(err) and "No space left" not in str(err):
            raise
        raise TrackingError(f"the tracking store {display_uri(uri)} cannot be written: no space left on its "
                            "device; free space there (the runs keep their metrics in their folders meanwhile)") from None


def _http_limits(retries: int, timeout_s: float) -> dict[str, str]:
    """MLflow's HTTP client settings that make it give up after ``retries`` retries and ``timeout_s``
    per request (its defaults retry for minutes)."""
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s))),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def limit_http(retries: int = 1, timeout_s: float = 20) -> None:
    """For the rest of this process, unless the user set them: MLflow's HTTP client gives up quickly.
    A job's mirror tries again on its next round, so training never waits on an unreachable server."""
    for name, value in _http_limits(retries, timeout_s).items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def bounded_http(retries: int = 1, timeout_s: float = 30) -> Iterator[None]:
    """Within the block, MLflow's HTTP client gives up after ``retries`` retries and ``timeout_s`` per
    request. For commands a person waits on; only these variables are restored after."""
    names = _http_limits(retries, timeout_s)
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


def prepare_store(uri: str, experiment: str, *, description: str | None = None,
                  artifact_root: str | os.PathLike | None = None) -> str:
    """Create the store's schema and the experiment once, before any worker starts (idempotent, also
    against a concurrent call; a deleted experiment is restored). Returns the experiment id.

    A new experiment in a SQLite store keeps its artifacts in ``<artifact_root or mlflow-artifacts/
    beside the database>/<experiment>``, a plain path valid for local jobs and for a server on that
    store. ``description`` becomes the experiment's description in the UI (MLflow's documented
    ``mlflow.note.content`` tag).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    tags = {MLFLOW_RUN_NOTE: description} if description else {}
    init_schema(uri)
    mlflow_client = client(uri)
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        root = Path(artifact_root) if artifact_root else default_artifact_root(uri)
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
        location = str((root / safe).absolute()) if root is not None and not is_http(uri) else None
        try:
            return mlflow_client.create_experiment(experiment, artifact_location=location, tags=tags)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = mlflow_client.get_experiment_by_name(experiment)
    if found.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(found.experiment_id)
    for key, value in tags.items():
        if found.tags.get(key) != value:
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


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
    names = sorted(e.name for e in mlflow_client.search_experiments(max_results=1000) if e.name != "Default")
    listed = ", ".join(names) if names else "none (run `bench.py ablate` first)"
    raise TrackingError(f"no grid or experiment {name_or_id!r} in {display_uri(uri)}; experiments: {listed}")


def experiment_exists(uri: str, name: str) -> bool:
    """Whether the store holds an experiment called ``name`` (deleted ones included)."""
    return client(uri).get_experiment_by_name(name) is not None


def display_uri(uri: str) -> str:
    """A URI for messages: credentials removed."""
    netloc = urlparse(uri).netloc
    return uri.replace(netloc, netloc.rpartition("@")[2], 1) if "@" in netloc else uri
