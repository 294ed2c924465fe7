"""Each cell's state from its run folder and the scheduler, without ``sacct``; reads only.

The run folder says what the run got to (``status.json``, ``results.json``: harness.run.folder);
the scheduler says whether any job submitted for the cell is still queued or alive
(:func:`harness.launch.slurm.job_states`; for local jobs, whether the process lives). Every
submission recorded for the cell is asked about, not only the newest: while any of them lives,
the cell is left alone. :func:`derive` combines the two and is a pure function; :func:`collect`
gathers its inputs for a whole grid with one Slurm query.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from harness.launch import slurm
from harness.launch.records import LAUNCH_FILE, LaunchRecord, Submission, read_record
from harness.launch.slurm import SlurmError, SlurmJobState
from harness.run.cell_state import CellState
from harness.run.folder import RESULTS_FILE, read_status
from harness.tracking import backlog

_REQUEUED = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
_QUEUED = {"PENDING", "CONFIGURING", "RESV_DEL_HOLD", *_REQUEUED}
_STOPPED = {"PREEMPTED", "SUSPENDED", "STOPPED"}
QUEUED_PREFIX = "queued:"  # a local cell waiting for a slot in the ablate process "queued:<pid>"


@dataclass(frozen=True)
class CellView:
    """A cell as ``status`` and ``ablate`` see it."""

    folder: Path
    record: LaunchRecord | None
    state: CellState
    reason: str | None = None  # why it failed, or what it waits for
    job_id: str | None = None  # its live job, else its latest
    job_alive: bool = False  # some job of the cell is queued or running
    attempts: int = 0
    stage: str | None = None  # pretrain | features | knn | linear | finetune | done
    step: int | None = None
    backlog: str = ""  # what its MLflow run still lacks of the folder

    @property
    def settled(self) -> bool:
        """Over, and no job of it alive: nothing will change it by itself (what --wait waits for)."""
        return not self.job_alive and self.state not in (CellState.PENDING, CellState.RUNNING)


def _alive(job: SlurmJobState | None) -> bool:
    return job is not None and not job.finished and job.state != "UNKNOWN"


def derive(status: Mapping[str, Any], finished: bool, submissions: Sequence[Submission],
           jobs: Mapping[str, SlurmJobState | None]) -> tuple[CellState, str | None, str | None, bool]:
    """(state, reason, job id, job alive) from the folder's ``status.json`` (``status``), whether
    ``results.json`` exists, the cell's submissions and the scheduler's view of their jobs."""
    run_state = CellState.parse(status.get("state"))
    reason = status.get("reason")
    live = [s for s in submissions if _alive(jobs.get(s.job_id))]
    latest = live[-1] if live else (submissions[-1] if submissions else None)
    job_id = latest.job_id if latest else None
    if finished or run_state == CellState.DONE:
        return CellState.DONE, None, job_id, bool(live)
    if latest is None:
        return (run_state or CellState.MISSING), reason, None, False
    job = jobs.get(latest.job_id)
    if live:
        # later submissions that died while this job lives were duplicates: the folder lock sent them away
        duplicates = [s.job_id for s in submissions[submissions.index(latest) + 1:]]
        note = f"duplicate job {', '.join(duplicates)} exited: job {job_id} holds the run folder" if duplicates else None
        if job.state in _QUEUED:
            stopped = job.state in _REQUEUED or job.restarts > 0 or run_state in (CellState.REQUEUED,
                                                                                  CellState.PREEMPTED)
            return (CellState.REQUEUED if stopped else CellState.PENDING), job.reason or reason, job_id, True
        if job.state in _STOPPED:
            return CellState.PREEMPTED, job.reason or note, job_id, True
        if run_state in (CellState.FAILED, CellState.REQUEUED, CellState.PREEMPTED):  # its job is ending
            return run_state, reason, job_id, True
        return CellState.RUNNING, note, job_id, True
    # No job of the cell lives: the folder decides, with the scheduler's last word on the job.
    where = f"job {latest.job_id}"
    if run_state == CellState.FAILED:
        return CellState.FAILED, reason, job_id, False
    if job is not None and job.state not in ("COMPLETED", "UNKNOWN"):
        detail = f" ({job.reason})" if job.reason else ""
        return CellState.FAILED, f"{where} ended {job.state}{detail} before the run finished: see its log", job_id, False
    if run_state in (CellState.REQUEUED, CellState.PREEMPTED):
        return run_state, f"{reason or 'stopped'}; not restarted yet: `ablate` resubmits it", job_id, False
    return (CellState.FAILED, f"{where} is gone and its run never wrote a final status (killed, out of memory, "
            "or the submitting command was interrupted): see its log", job_id, False)


def plan_action(view: CellView, force: bool) -> str:
    """What ``ablate`` does with a cell: ``restart`` (--force), ``skip`` (done), ``leave`` (a job
    of it lives), else ``submit`` (resuming from its checkpoint)."""
    if force:
        return "restart"
    if view.state == CellState.DONE:
        return "skip"
    return "leave" if view.job_alive else "submit"


def local_job_state(submission: Submission) -> SlurmJobState | None:
    """A local job seen from this host: RUNNING while its process lives, PENDING while the ablate
    process that will start it lives, else None (gone)."""
    queued = submission.job_id.startswith(QUEUED_PREFIX)
    pid = submission.job_id.removeprefix(QUEUED_PREFIX)
    if submission.host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    if queued:
        return SlurmJobState(submission.job_id, "PENDING", "waiting for a free local slot")
    # a recycled pid runs something else
    return SlurmJobState(submission.job_id, "RUNNING") if "submitit" in cmdline else None


def scheduler_states(submissions: Sequence[Submission]) -> dict[str, SlurmJobState | None]:
    """Job id -> scheduler state for the given submissions (one squeue/scontrol round). When
    Slurm cannot be asked, its jobs map to None and the folders decide alone."""
    out: dict[str, SlurmJobState | None] = {}
    if slurm_ids := [s.job_id for s in submissions if s.executor == "slurm"]:
        try:
            out |= slurm.job_states(slurm_ids)
        except SlurmError:
            out |= dict.fromkeys(slurm_ids)
    for sub in submissions:
        if sub.executor == "local":
            out[sub.job_id] = local_job_state(sub)
    return out


def collect(cell_dirs: Sequence[Path]) -> list[CellView]:
    """Read every cell folder and ask the scheduler once about all their jobs."""


    records = [read_record(d / LAUNCH_FILE, LaunchRecord) for d in cell_dirs]
    jobs = scheduler_states([s for r in records if r is not None for s in r.submissions])
    views = []
    for folder, record in zip(cell_dirs, records):
        status = read_status(folder)
        state, reason, job_id, alive = derive(status, (folder / RESULTS_FILE).is_file(),
                                              record.submissions if record else [], jobs)
        views.append(CellView(folder, record, state, reason, job_id, alive, int(status.get("attempts", 0)),
                              status.get("stage"), status.get("step"),
                              backlog(folder, live=alive) if record is not None and record.tracking_run_id else ""))
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
