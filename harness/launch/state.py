"""Each cell's state from its run folder and the scheduler, without ``sacct``.

The run folder says what the run itself got to (``status.json`` and ``results.json``, written
by harness.run and the job); the scheduler says whether a job is still queued or alive
(:func:`harness.launch.slurm.job_states`: squeue, then scontrol for recently finished jobs;
for local jobs, whether the process lives). :func:`derive_state` combines the two and is a pure
function; :func:`collect` gathers its inputs for a whole grid with one Slurm query.

States: ``missing`` (never submitted), ``pending``, ``running``, ``requeued``, ``preempted``,
``done``, ``failed``. A job that vanished without its run writing a final status (killed,
cancelled, out of memory, node failure) is ``failed`` with a reason that says so.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.launch.records import LAUNCH_FILE, LaunchRecord, Submission, read_record
from harness.launch.slurm import FINISHED_STATES, SlurmError, SlurmJobState

STATES = ("missing", "pending", "running", "requeued", "preempted", "done", "failed")
ACTIVE = frozenset({"pending", "running", "requeued", "preempted"})

_QUEUED = {"PENDING", "CONFIGURING", "RESV_DEL_HOLD"}
_REQUEUED = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
_STOPPED = {"PREEMPTED", "SUSPENDED", "STOPPED"}


@dataclass(frozen=True)
class CellState:
    state: str  # one of STATES
    reason: str | None = None  # why it failed / why it waits
    attempts: int = 0  # times the run started (status.json)
    restarts: int = 0  # Slurm requeues of the current job
    job_id: str | None = None
    step: int | None = None  # last step reached (for finished or failed runs)
    # the scheduler still runs the job: a done run's job may still be logging to MLflow
    job_alive: bool = False

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def settled(self) -> bool:
        """Over, and its job gone: nothing will change it any more (what --wait waits for)."""
        return not self.active and not self.job_alive


def derive_state(status: Mapping[str, Any] | None, finished: bool, submission: Submission | None,
                 job: SlurmJobState | None) -> CellState:
    """Combine a run folder's ``status.json`` (``status``), whether ``results.json`` exists
    (``finished``), the latest submission and the scheduler's view of its job (None: not
    asked or unknown to the scheduler)."""
    status = dict(status or {})
    attempts = int(status.get("attempts", 0))
    run_state = status.get("state")
    alive = job is not None and job.state not in FINISHED_STATES and job.state != "UNKNOWN"
    common = {"attempts": attempts, "restarts": job.restarts if job else 0,
              "job_id": submission.job_id if submission else None, "step": status.get("step"),
              "job_alive": alive}
    if finished or run_state == "done":
        return CellState("done", **common)
    if submission is None and run_state is None:
        return CellState("missing", **common)
    slurm_state = job.state if job is not None else "UNKNOWN"
    where = f"job {submission.job_id}" if submission else "the run"
    if slurm_state in _QUEUED:
        # a job Slurm requeued (same id) waits again; a new submission is just pending
        return CellState("requeued" if job.restarts > 0 else "pending", job.reason or None, **common)
    if slurm_state in _REQUEUED:
        return CellState("requeued", job.reason or None, **common)
    if slurm_state in _STOPPED:
        return CellState("preempted", job.reason or None, **common)
    if slurm_state != "UNKNOWN" and slurm_state not in FINISHED_STATES:  # RUNNING, COMPLETING, ...
        if run_state == "failed":
            return CellState("failed", status.get("reason"), **common)
        if run_state == "requeued":
            return CellState("requeued", status.get("reason"), **common)
        return CellState("running", **common)
    # The job is over (or forgotten by the scheduler) and the run did not finish.
    if run_state == "failed":
        return CellState("failed", status.get("reason"), **common)
    if slurm_state == "UNKNOWN":
        reason = (f"{where} is gone and its run never wrote a final status (killed, out of memory, "
                  "or the submitting command was interrupted): see its log")
    else:
        detail = f" ({job.reason})" if job and job.reason else ""
        reason = f"{where} ended {slurm_state}{detail} before the run finished: see its log"
    return CellState("failed", reason, **common)


def plan(state: CellState, force: bool) -> str:
    """What ``ablate`` does with a cell: ``submit`` (missing/failed, resuming from its
    checkpoint), ``skip`` (done), ``leave`` (queued or running), ``restart`` (--force)."""
    if force:
        return "restart"
    if state.state in ("missing", "failed"):
        return "submit"
    return "skip" if state.state == "done" else "leave"


# --- gathering the inputs ------------------------------------------------------------------------

def read_status(cell_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cell_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


QUEUED_PREFIX = "queued:"  # a local cell waiting for a slot in the ablate process "queued:<pid>"


def local_job_state(submission: Submission) -> SlurmJobState | None:
    """A local job seen from this host: RUNNING while its process lives, PENDING while the
    ablate process that will start it lives, else None (gone)."""
    queued = submission.job_id.startswith(QUEUED_PREFIX)
    pid = submission.job_id.removeprefix(QUEUED_PREFIX)
    if submission.host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if queued:
        return SlurmJobState(submission.job_id, "PENDING", "waiting for a free local slot")
    # a recycled pid runs something else
    return SlurmJobState(submission.job_id, "RUNNING") if b"submitit" in cmdline else None


def scheduler_states(submissions: Sequence[Submission]) -> dict[str, SlurmJobState | None]:
    """Job id -> scheduler state for the given submissions (one squeue/scontrol round).

    When Slurm cannot be asked, Slurm jobs map to None and the folders decide alone.
    """
    from harness.launch import slurm

    out: dict[str, SlurmJobState | None] = {}
    slurm_ids = [s.job_id for s in submissions if s.executor == "slurm"]
    if slurm_ids:
        try:
            out |= {k: (None if v.state == "UNKNOWN" else v) for k, v in slurm.job_states(slurm_ids).items()}
        except SlurmError:
            out |= dict.fromkeys(slurm_ids)
    for sub in submissions:
        if sub.executor == "local":
            out[sub.job_id] = local_job_state(sub)
    return out


@dataclass(frozen=True)
class CellView:
    """A cell folder as status sees it."""

    folder: Path
    record: LaunchRecord | None
    state: CellState


def collect(cell_dirs: Sequence[Path]) -> list[CellView]:
    """Read every cell folder and ask the scheduler once about their latest jobs."""
    records = [read_record(d / LAUNCH_FILE, LaunchRecord) for d in cell_dirs]
    subs = [r.last for r in records if r is not None and r.last is not None]
    jobs = scheduler_states(subs)
    views = []
    for folder, record in zip(cell_dirs, records):
        last = record.last if record else None
        state = derive_state(read_status(folder), (folder / "results.json").is_file(), last,
                             jobs.get(last.job_id) if last else None)
        views.append(CellView(folder, record, state))
    return views


def log_files(submission: Submission | None) -> list[Path]:
    """The job's log files (stderr first: it has the traceback), those that exist."""
    if submission is None or not submission.log_dir:
        return []
    folder = Path(submission.log_dir)
    found = sorted(folder.glob("*_log.err")) + sorted(folder.glob("*_log.out"))
    return [p for p in found if p.is_file()]


def tail(path: Path, lines: int = 8, max_bytes: int = 64_000) -> list[str]:
    """The last ``lines`` non-empty lines of a (possibly large) text file."""
    with path.open("rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - max_bytes))
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]
