"""A detached ``mlflow server`` for jobs on a cluster, and the foreground UI of ``bench.py ui``.

Jobs on Slurm log over HTTP to one server on the submitting host instead of opening the
SQLite file from many nodes (SQLite on a network filesystem corrupts). :func:`ensure_server`
starts that server in its own session, so it outlives the ``ablate`` command, and records it
in ``<state_dir>/mlflow-server.json``; the next ``ablate`` reuses it while it is healthy.

Facts that shaped this (MLflow 3.17):

* Start-up takes 10-45 s on a busy 2-core machine (uvicorn workers import MLflow), hence
  the generous default wait.
* The server checks the Host header of API calls (not of ``/health``) against
  ``--allowed-hosts`` (default: localhost and private IPs). The advertised host name is added,
  else nodes reaching it by name get HTTP 400.
* The server's job runner (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION``) is not needed and is
  turned off: one process less.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.filelock import exclusive_lock
from harness.tracking.schema import TrackingError
from harness.tracking.store import check_store, init_schema, sqlite_path

STATE_FILE = "mlflow-server.json"
LOG_FILE = "mlflow-server.log"
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class ServerInfo:
    url: str  # what clients (and compute nodes) use as tracking URI
    pid: int
    port: int
    host: str  # the interface it binds
    store_uri: str
    artifact_root: str
    log_path: str
    started_at: float
    reused: bool = False  # True when an already running server was returned


# --- helpers ---------------------------------------------------------------------------------

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


def advertised_host(bind_host: str) -> str:
    """A name for this host that compute nodes can use.

    ``MILAN_BENCH_TRACKING_HOST`` wins; a loopback bind is ``127.0.0.1``; an explicit bind
    address is itself; otherwise the fully qualified name, else the short host name, when it
    resolves to a non-loopback address; else ``127.0.0.1`` (this host has no name others could
    use: a single-machine cluster; set MILAN_BENCH_TRACKING_HOST otherwise).
    """
    if env := os.environ.get("MILAN_BENCH_TRACKING_HOST", "").strip():
        return env
    if bind_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    if bind_host not in ("0.0.0.0", "", "::"):
        return bind_host
    for name in (socket.getfqdn(), socket.gethostname()):
        try:
            address = socket.gethostbyname(name)
        except OSError:
            continue
        if name and name != "localhost" and not address.startswith("127."):
            return name
    return "127.0.0.1"


def _allowed_hosts(advertised: str, port: int) -> str:
    names = {"localhost", "127.0.0.1", advertised, socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names.add(socket.gethostbyname(socket.gethostname()))
    hosts = [h for name in sorted(n for n in names if n) for h in (name, f"{name}:*")]
    private = ["10.*", "192.168.*", *(f"172.{i}.*" for i in range(16, 32)), "[[]::1]:*", "[::1]"]
    return ",".join(hosts + private)


def healthy(url: str, timeout_s: float = 2.0) -> bool:
    import requests

    try:
        return requests.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as gone
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


def _is_mlflow(pid: int) -> bool:
    """Whether ``pid`` still runs an MLflow server (not a process that reused its id)."""
    try:
        return b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid


def _log_tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        text = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in text if "Error" in line or "error" in line]
        return " | ".join((errors or text)[-lines:])[:400]
    return ""


def server_command(store_uri: str, artifact_root: Path, host: str, port: int, workers: int) -> list[str]:
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    launcher = [str(mlflow_exe)] if mlflow_exe.exists() else [sys.executable, "-m", "mlflow"]
    return [*launcher, "server", "--backend-store-uri", store_uri,
            "--artifacts-destination", str(artifact_root), "--host", host, "--port", str(port),
            "--workers", str(workers)]


def _server_env(advertised: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no route out from cluster hosts
    env["MLFLOW_SERVER_ALLOWED_HOSTS"] = _allowed_hosts(advertised, port)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _wait_healthy(proc_pid: int, url: str, log_path: Path, timeout_s: float,
                  poll: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(url, timeout_s=2):
            return
        exited = poll.poll() if poll is not None else (None if pid_alive(proc_pid) else -1)
        if exited is not None:
            raise TrackingError(f"mlflow server exited (code {exited}) during start-up: see {log_path}"
                                + (f" ({tail})" if (tail := _log_tail(log_path)) else ""))
        time.sleep(0.5)
    raise TrackingError(f"mlflow server did not become healthy at {url} within {timeout_s:.0f} s: "
                        f"see {log_path}")


# --- the detached server ---------------------------------------------------------------------

def read_state(state_dir: str | os.PathLike) -> ServerInfo | None:
    path = Path(state_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
        return ServerInfo(**{k: v for k, v in data.items() if k in ServerInfo.__dataclass_fields__})
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def _locked(state_dir: Path) -> contextlib.AbstractContextManager[None]:
    return exclusive_lock(state_dir / "mlflow-server.lock")


def ensure_server(store_uri: str, artifact_root: str | os.PathLike, state_dir: str | os.PathLike,
                  host: str = "0.0.0.0", port: int | None = None, *, workers: int = 2,
                  timeout_s: float = START_TIMEOUT_S) -> ServerInfo:
    """A healthy ``mlflow server`` over ``store_uri``: the one recorded in ``state_dir`` when it
    still runs on that store, else a new one started detached (own session: it outlives this
    process) on ``port`` (a free one when None). Waits until it answers (``timeout_s``);
    raises :class:`TrackingError` naming the server log otherwise. Its ``url`` uses a host
    name the compute nodes can reach (see :func:`advertised_host`).
    """
    state_dir = Path(state_dir).absolute()
    artifact_root = Path(artifact_root).absolute()
    with _locked(state_dir):
        current = read_state(state_dir)
        if current is not None and pid_alive(current.pid) and _is_mlflow(current.pid):
            if current.store_uri != store_uri:
                raise TrackingError(
                    f"an mlflow server for another store ({current.store_uri}) runs at {current.url} "
                    f"(pid {current.pid}): stop it (harness.tracking.stop_server) or use another state dir")
            if not healthy(current.url):  # maybe still starting
                _wait_healthy(current.pid, current.url, Path(current.log_path), timeout_s)
            return ServerInfo(**{**asdict(current), "reused": True})
        (state_dir / STATE_FILE).unlink(missing_ok=True)

        port = port or free_port(host)
        if port_in_use(port, host):
            raise TrackingError(f"port {port} is in use: pick another port or leave it unset")
        if sqlite_path(store_uri) is not None:
            init_schema(store_uri)  # the workers must not race on a fresh schema
        else:
            check_store(store_uri)
        artifact_root.mkdir(parents=True, exist_ok=True)
        advertised = advertised_host(host)
        url = f"http://{advertised}:{port}"
        log_path = state_dir / LOG_FILE
        with log_path.open("ab") as log_file:
            proc = subprocess.Popen(server_command(store_uri, artifact_root, host, port, workers),
                                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=_server_env(advertised, port), start_new_session=True,
                                    cwd=state_dir)
        info = ServerInfo(url=url, pid=proc.pid, port=port, host=host, store_uri=store_uri,
                          artifact_root=str(artifact_root), log_path=str(log_path),
                          started_at=time.time())
        (state_dir / STATE_FILE).write_text(json.dumps(asdict(info), indent=2))
        try:
            _wait_healthy(proc.pid, url, log_path, timeout_s, poll=proc)
        except TrackingError:
            _terminate_group(proc.pid)
            (state_dir / STATE_FILE).unlink(missing_ok=True)
            raise
        return info


def _terminate_group(pid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the server's process group (it leads its own session), SIGKILL after grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            if not pid_alive(pid):
                return
            time.sleep(0.1)


def stop_server(state_dir: str | os.PathLike) -> bool:
    """Stop the server recorded in ``state_dir``; False when none was running."""
    state_dir = Path(state_dir)
    with _locked(state_dir):
        info = read_state(state_dir)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        if info is None or not pid_alive(info.pid) or not _is_mlflow(info.pid):
            return False
        _terminate_group(info.pid)
        return True


# --- bench.py ui ------------------------------------------------------------------------------

def serve_ui(store_uri: str, *, port: int = 5000, host: str = "127.0.0.1",
             artifact_root: str | os.PathLike | None = None, timeout_s: float = START_TIMEOUT_S,
             on_ready=None) -> int:
    """Run the MLflow UI for ``store_uri`` in the foreground until Ctrl-C (or until the
    server exits); ``on_ready(url, log_path)`` is called once it answers. Returns the
    server's exit code (0 after Ctrl-C or SIGTERM)."""
    from harness.tracking.store import default_artifact_root

    if port_in_use(port, host):
        raise TrackingError(f"port {port} on {host} is in use: pick another with --port")
    if sqlite_path(store_uri) is not None:
        init_schema(store_uri)
    else:
        check_store(store_uri)
    root = Path(artifact_root) if artifact_root else (default_artifact_root(store_uri) or Path("mlflow-artifacts"))
    root.mkdir(parents=True, exist_ok=True)
    url = f"http://{'127.0.0.1' if host in ('127.0.0.1', 'localhost') else advertised_host(host)}:{port}"
    log_path = Path(tempfile.gettempdir()) / f"milan-bench-ui-{port}.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(server_command(store_uri, root.absolute(), host, port, workers=1),
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=_server_env(advertised_host(host), port), start_new_session=True)

    def interrupt(signum, frame):  # SIGTERM ends the UI like Ctrl-C: the server goes too
        raise KeyboardInterrupt

    # SIGINT explicitly too: a process started in the background of a non-interactive shell
    # inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + timeout_s
        while not healthy(url):
            if proc.poll() is not None:
                raise TrackingError(f"mlflow server exited (code {proc.returncode}) during start-up: "
                                    f"see {log_path}" + (f" ({tail})" if (tail := _log_tail(log_path)) else ""))
            if time.monotonic() > deadline:
                raise TrackingError(f"the MLflow UI did not answer at {url} within {timeout_s:.0f} s")
            time.sleep(0.5)
        if on_ready is not None:
            on_ready(url, log_path)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            _terminate_group(proc.pid)
