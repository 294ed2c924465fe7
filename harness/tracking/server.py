"""A detached ``mlflow server`` for jobs on a cluster, and the foreground UI of ``bench.py ui``.

Jobs on Slurm log over HTTP to one server on the submitting host instead of opening the SQLite file
from many nodes (SQLite on a network filesystem corrupts). :func:`ensure_server` starts it as the
leader of its own process group (it outlives ``ablate``; ``mlflow server`` runs uvicorn as a child, so
the server is the whole group) and records it in ``<state_dir>/mlflow-server.json``. The next
``ablate`` reuses it while the group lives and answers, else restarts it, on the same port when free
(running jobs then reconnect without noticing). Never two servers over one store: the state folder's
lock serialises starts, and a group whose leader died but whose children still serve is stopped first.

MLflow 3.17 facts: start-up takes 10-45 s on a busy 2-core machine (uvicorn workers import MLflow); the
server checks the Host header of API calls (not of ``/health``) against ``--allowed-hosts``, so the
advertised host name is added (else nodes reaching it by name get HTTP 400); its job runner
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``) is not needed and turned off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from filelock import FileLock

from harness.core.files import read_json, write_json_atomic
from harness.tracking.schema import TrackingError
from harness.tracking.store import ARTIFACTS_DIR, default_artifact_root, init_schema

STATE_FILE, LOG_FILE, LOCK_FILE = "mlflow-server.json", "mlflow-server.log", "mlflow-server.lock"
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ServerInfo:
    url: str  # what clients (and compute nodes) use as tracking URI
    pgid: int  # the server's process group (its leader's pid)
    port: int
    host: str  # the interface it binds
    store_uri: str
    log_path: str
    started_at: float
    reused: bool = False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host if host != "0.0.0.0" else "", 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host != "0.0.0.0" else "", port))
        except OSError:
            return True
    return False


def server_answers(url: str, timeout_s: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def advertised_host(bind_host: str) -> str:
    """A name for this host that compute nodes can use: ``MILAN_BENCH_TRACKING_HOST``; a loopback
    or explicit bind address itself; else this host's name when it resolves to a non-loopback
    address; else 127.0.0.1 (a single-machine cluster)."""
    if env := os.environ.get("MILAN_BENCH_TRACKING_HOST", "").strip():
        return env
    if bind_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    if bind_host not in ("0.0.0.0", "", "::"):
        return bind_host
    for name in (socket.getfqdn(), socket.gethostname()):
        with contextlib.suppress(OSError):
            if name and name != "localhost" and not socket.gethostbyname(name).startswith("127."):
                return name
    return "127.0.0.1"


def _allowed_hosts(advertised: str) -> str:
    names = {"localhost", "127.0.0.1", advertised, socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names.add(socket.gethostbyname(socket.gethostname()))
    hosts = [h for name in sorted(n for n in names if n) for h in (name, f"{name}:*")]
    private = ["10.*", "192.168.*", *(f"172.{i}.*" for i in range(16, 32)), "[[]::1]:*", "[::1]"]
    return ",".join(hosts + private)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group lives (zombies do not count)."""
    import psutil

    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
    return False


def stop_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the whole process group, SIGKILL whatever is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pgid, os.WNOHANG)  # reap the leader when it is our child
            if not group_alive(pgid):
                return
            time.sleep(0.1)


def _log_tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in text if "rror" in line]
        return " | ".join((errors or text)[-lines:])[:400]
    return ""


def _start(store_uri: str, artifact_root: Path, host: str, port: int, workers: int, log_path: Path,
           cwd: Path | None = None) -> subprocess.Popen:
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    launcher = [str(mlflow_exe)] if mlflow_exe.exists() else [sys.executable, "-m", "mlflow"]
    command = [*launcher, "server", "--backend-store-uri", store_uri, "--artifacts-destination",
               str(artifact_root), "--host", host, "--port", str(port), "--workers", str(workers)]
    advertised = advertised_host(host)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_SERVER_ALLOWED_HOSTS": _allowed_hosts(advertised)}
    init_schema(store_uri)  # the workers must not race on a fresh schema
    artifact_root.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, cwd=cwd)


def _wait_healthy(url: str, exited: Callable[[], int | None], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not server_answers(url):
        if (code := exited()) is not None:
            tail = _log_tail(log_path)
            raise TrackingError(f"mlflow server exited (code {code}) during start-up: see {log_path}"
                                + (f" ({tail})" if tail else ""))
        if time.monotonic() > deadline:
            raise TrackingError(f"mlflow server did not answer at {url} within {timeout_s:.0f} s: see {log_path}")
        time.sleep(0.5)


def read_state(state_dir: str | os.PathLike) -> ServerInfo | None:
    """The server recorded in ``state_dir`` (it may be down), or None."""
    data = read_json(Path(state_dir) / STATE_FILE)
    try:
        return ServerInfo(**{k: v for k, v in data.items() if k in ServerInfo.__dataclass_fields__})
    except (TypeError, AttributeError):
        return None


def ensure_server(store_uri: str, artifact_root: str | os.PathLike, state_dir: str | os.PathLike,
                  host: str = "0.0.0.0", *, workers: int = 2, timeout_s: float = START_TIMEOUT_S) -> ServerInfo:
    """A healthy ``mlflow server`` over ``store_uri``: the recorded one while its group lives and
    answers, else a new one, on the recorded port when free. Raises :class:`TrackingError`
    naming the server log when it does not come up within ``timeout_s``."""
    state_dir = Path(state_dir).absolute()
    state_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(state_dir / LOCK_FILE):
        current = read_state(state_dir)
        if current is not None and group_alive(current.pgid):
            if current.store_uri != store_uri:
                raise TrackingError(f"an mlflow server for another store ({current.store_uri}) runs at "
                                    f"{current.url} (process group {current.pgid}): stop it or use another runs folder")
            try:  # maybe still starting
                _wait_healthy(current.url, lambda: None if group_alive(current.pgid) else -1,
                              Path(current.log_path), timeout_s)
                return replace(current, reused=True)
            except TrackingError:
                stop_group(current.pgid)  # alive but not serving: replace it
        port = current.port if current is not None and not port_in_use(current.port, host) else free_port(host)
        log_path = state_dir / LOG_FILE
        proc = _start(store_uri, Path(artifact_root).absolute(), host, port, workers, log_path, cwd=state_dir)
        info = ServerInfo(url=f"http://{advertised_host(host)}:{port}", pgid=proc.pid, port=port, host=host,
                          store_uri=store_uri, log_path=str(log_path), started_at=time.time())
        write_json_atomic(state_dir / STATE_FILE, asdict(info))
        try:
            _wait_healthy(info.url, proc.poll, log_path, timeout_s)
        except TrackingError:
            stop_group(proc.pid)
            (state_dir / STATE_FILE).unlink(missing_ok=True)
            raise
        return info


def stop_server(state_dir: str | os.PathLike) -> bool:
    """Stop the server recorded in ``state_dir`` (its whole group); False when none was running."""
    state_dir = Path(state_dir)
    with FileLock(state_dir / LOCK_FILE):
        info = read_state(state_dir)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        if info is None or not group_alive(info.pgid):
            return False
        stop_group(info.pgid)
        return True


def serve_ui(store_uri: str, *, port: int, on_ready: Callable[[str, Path], None],
             timeout_s: float = START_TIMEOUT_S) -> int:
    """Run the MLflow UI for ``store_uri`` on 127.0.0.1 in the foreground until Ctrl-C or SIGTERM
    (or until the server exits); ``on_ready(url, log_path)`` once it answers. Returns its exit code.
    Artifacts are served from beside a SQLite store (``mlflow-artifacts/``)."""
    if port_in_use(port):
        raise TrackingError(f"port {port} on 127.0.0.1 is in use: pick another with --port")
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.gettempdir()) / f"milan-bench-ui-{port}.log"
    log_path.unlink(missing_ok=True)
    artifact_root = default_artifact_root(store_uri) or Path(ARTIFACTS_DIR).absolute()
    proc = _start(store_uri, artifact_root, "127.0.0.1", port, 1, log_path)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGINT explicitly too: a process started in the background of a non-interactive shell
    # inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _wait_healthy(url, proc.poll, log_path, timeout_s)
        on_ready(url, log_path)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group(proc.pid)
