"""A run folder: the one place a cell's state is written, and the lock that keeps one job in it.

Layout::

    config.yaml      the resolved configuration
    status.json      state (a :class:`~harness.run.cell_state.CellState`), reason, stage, step, attempts,
                     host, job: written by :func:`write_status` only
    metrics.jsonl    per-step metrics, the run's history (MLflow mirrors it: harness.tracking.sync)
    results.json     pretraining summary + evaluation metrics, written once both are done
    checkpoints/     latest.pt, written atomically
    .lock-rank<r>    held by rank r of the job that runs here, for the job's whole life

A second job for the same cell (a duplicate submission, or a requeue that raced a live attempt)
finds the lock taken and exits at once without writing anything (:class:`FolderBusy`).

A run stopped by the scheduler (``scontrol requeue`` and preemption send SIGTERM to every process
of the job, DataLoader workers included; submitit turns the time limit's USR2 into a requeue) is
``requeued``, never ``failed``: :class:`SchedulerStopWatch` remembers the signal, and
:func:`stopped_by_scheduler` also recognises the error a worker killed by that signal raises in
the main process before the signal reaches it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from harness.run.cell_state import CellState
from harness.core.errors import UserError
from harness.core.files import read_json, write_json_atomic

STATUS_FILE = "status.json"
RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
OWNER_FILE = "owner.json"
EVAL_DIR = "eval"  # evaluation stages' work in progress (feature shards), removed when done


class FolderBusy(UserError):
    """Another live job holds this run folder: this one must exit and touch nothing."""


class FolderOfAnotherRun(UserError):
    """The run folder holds the run of another config: it is neither resumed nor reported."""


def check_owner(run_dir: Path, run_id: str) -> None:
    """Refuse ``run_dir`` (without touching it) when its status or results name another run than
    ``run_id``: a folder belongs to one config, and its results are that config's."""
    for record in (read_status(run_dir), read_results(run_dir) or {}):
        if (other := record.get("run_id")) and other != run_id:
            raise FolderOfAnotherRun(f"run folder {run_dir} holds run {other} of another config (this one is "
                                     f"{run_id}): give another --out, or remove that folder to run this config there")


def read_status(run_dir: Path) -> dict[str, Any]:
    status = read_json(Path(run_dir) / STATUS_FILE)
    return status if isinstance(status, dict) else {}


def read_results(run_dir: Path) -> dict[str, Any] | None:
    results = read_json(Path(run_dir) / RESULTS_FILE)
    return results if isinstance(results, dict) else None


def weights_source(weights_from: str, runs_dir: Path) -> Path:
    """The run folder a ``pretrain.weights_from`` names: absolute, or under the runs dir."""
    return Path(weights_from) if Path(weights_from).is_absolute() else Path(runs_dir) / weights_from


def finished_source(weights_from: str, runs_dir: Path) -> dict[str, Any]:
    """The results of the finished run whose encoder a run evaluates; a UserError saying what to do
    while it has not finished."""
    folder = weights_source(weights_from, runs_dir)
    results = read_results(folder)
    if results is None:
        status = read_json(folder / STATUS_FILE)
        state = status.get("state", "unknown") if isinstance(status, dict) else "not started"
        raise UserError(f"the run whose encoder this cell evaluates ({folder}) has not finished ({state}): "
                        f"finish its grid first (`bench.py ablate {Path(weights_from).parts[0]}`)")
    return results


def write_status(run_dir: Path, state: CellState, *, new_attempt: bool = False, **fields: Any) -> None:
    """Update ``status.json`` (the only writer): ``state`` plus ``fields``; ``new_attempt`` counts a
    (re)start of the run in ``attempts`` and clears the previous attempt's reason."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    status.update(state=CellState(state).value, updated=time.time(), host=socket.gethostname(), **fields)
    if new_attempt:
        status.setdefault("started", time.time())
        status["attempts"] = status.get("attempts", 0) + 1
        status.pop("reason", None)
    if status["state"] in (CellState.PENDING, CellState.RUNNING, CellState.DONE):
        status.pop("reason", None)
    write_json_atomic(run_dir / STATUS_FILE, status)


def mark_unfinished(run_dirs: Sequence[Path], state: CellState, reason: str) -> None:
    """Record ``state`` for every run of ``run_dirs`` that has not ended (done or failed)."""
    for run_dir in map(Path, run_dirs):
        if not CellState.parse(read_status(run_dir).get("state"), CellState.MISSING).terminal:
            write_status(run_dir, state, reason=reason)


def failure_reason(err: BaseException) -> str:
    """An error as a run's one-line reason: a UserError's own message, else its type and first line."""
    first = (str(err).strip().splitlines() or [""])[0]
    return first if isinstance(err, UserError) else f"{type(err).__name__}: {first}"


def job_id_here() -> str:
    """This process's job: the Slurm array task or job id, else ``pid <n>@<host>``."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or f"pid {os.getpid()}@{socket.gethostname()}"


@contextlib.contextmanager
def hold(run_dir: Path, rank: int = 0) -> Iterator[None]:
    """Hold rank ``rank``'s exclusive lock on ``run_dir`` for the block, or raise :class:`FolderBusy`
    at once when a live job holds it (the kernel frees the lock when that job dies, however it dies).

    Every rank takes its own lock, so all ranks of a duplicate job exit, not only rank 0."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(run_dir / f".lock-rank{rank}", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        owner = read_json(run_dir / OWNER_FILE) or {}
        raise FolderBusy(f"run folder {run_dir} is held by job {owner.get('job', '?')} (rank {rank}): "
                         f"this job ({job_id_here()}) is a duplicate and exits without touching it") from None
    try:
        if rank == 0:
            write_json_atomic(run_dir / OWNER_FILE, {"job": job_id_here(), "pid": os.getpid(),
                                                     "host": socket.gethostname(), "since": time.time()})
        yield
    finally:
        lock.release()


class SchedulerStopWatch:
    """Remembers whether the scheduler asked this process to stop (SIGTERM), while installed, and
    calls ``on_stop(signal name)`` the first time (to record it before the SIGKILL that may follow).

    The previous handler still runs (submitit's bypass), so the job keeps its own behaviour;
    only the classification of the error that follows changes."""

    def __init__(self, on_stop: Callable[[str], None] | None = None) -> None:
        self.signal: str | None = None
        self.on_stop = on_stop
        self._previous: Any = None

    def __enter__(self) -> SchedulerStopWatch:
        with contextlib.suppress(ValueError):  # not the main thread: nothing to watch
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signal is None
        self.signal = signal.Signals(signum).name
        if first and self.on_stop is not None:
            self.on_stop(self.signal)
        if callable(self._previous):
            self._previous(signum, frame)
        elif self._previous == signal.SIG_DFL:  # the process's own behaviour: it terminates
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._previous)


# A DataLoader worker killed by the scheduler's SIGTERM surfaces in the main process as this error,
# sometimes before the signal reaches the main process itself.
_WORKER_TERMINATED = "is killed by signal: Terminated"


def stopped_by_scheduler(err: BaseException, watch: SchedulerStopWatch | None) -> str | None:
    """Why the run stopped, when it was the scheduler and not the run's own failure; else None."""
    if watch is not None and watch.signal:
        return (f"stopped by the scheduler ({watch.signal}: requeue, preemption or cancellation); "
                "resumes from its last checkpoint")
    if _WORKER_TERMINATED in str(err):
        return "a DataLoader worker was stopped by SIGTERM (requeue or preemption); resumes from its last checkpoint"
    return None

