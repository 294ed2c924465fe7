"""``ablate``'s third step: submit the planned jobs, one :class:`~.job.GroupJob` per group of cells,
through an executor (:mod:`.executors`): a Slurm job array, local processes, or this process. Every
cell's launch record gets each submission (:mod:`.records`), so ``status`` never needs the
scheduler's history. Also what ``--force`` does before a restart: cancel and clear.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import submitit

from harness.core.errors import UserError
from harness.grid import Cell
from harness.launch import slurm
from harness.launch.cell_views import QUEUED_PREFIX, CellView
from harness.launch.estimate import gpu_hours
from harness.launch.executors import local_executor, local_slots, run_debug, run_local, slurm_executor, submit_array
from harness.launch.job import GroupJob
from harness.launch.plan import Plan, job_time_limit
from harness.launch.records import LAUNCH_FILE, SUBMITIT_DIR, LaunchRecord, Submission, link_logs, write_record
from harness.launch.register import Registration
from harness.run.cell_state import CellState
from harness.run.folder import mark_unfinished, write_status
from harness.tracking import per_run, schema, set_run_tags

Echo = Callable[[str], None]


class Submitter:
    """Submits a plan's jobs and records each submission in its cells' launch records."""

    def __init__(self, plan: Plan, registration: Registration, echo: Echo) -> None:
        self.plan, self.echo = plan, echo
        self.launches = list(registration.launches)
        self.store = registration.record.store

    def slurm(self) -> None:
        """One job array; returns as soon as it is queued."""
        self._supersede()
        plan, grid = self.plan, self.plan.grid
        max_timeouts, _ = job_time_limit(grid, plan.cells, plan.groups, gpu_hours(grid))
        executor = slurm_executor(plan.gdir / SUBMITIT_DIR, grid.resources, job_name=f"milan-{grid.name}",
                                  max_timeouts=max_timeouts)
        jobs = submit_array(executor, self._jobs(grid.resources.cpus_per_task))
        for group, job in zip(plan.groups, jobs):
            self._record(group, job.job_id, "slurm", Path(job.paths.folder))
        # the job id ("<array>_<task>") in the store from now on, not only once the job starts and syncs
        job_of = {i: job.job_id for group, job in zip(plan.groups, jobs) for i in group}
        uri = self.store.writer_uri()
        per_run(uri, lambda i: set_run_tags(uri, self.launches[i].tracking_run_id, {schema.SLURM_JOB_ID: job_of[i]}),
                list(range(len(plan.todo))))
        self.echo(f"submitted {len(plan.todo)} cells as {jobs_text(plan.groups)} in Slurm job array "
                  f"{jobs[0].job_id.partition('_')[0]} ({grid.resources.summary()} each)")

    def local(self, on_tick: Callable[[], None], poll_s: float) -> None:
        """Local processes, as many at a time as the cores allow; returns when all have ended."""
        self._supersede()
        plan = self.plan
        concurrency, threads = local_slots(plan.grid.resources)
        for group in plan.groups:  # status shows them pending until they start
            self._record(group, f"{QUEUED_PREFIX}{os.getpid()}", "local", None)
        self.echo(f"running {len(plan.todo)} cells here as {jobs_text(plan.groups)}, {concurrency} at a time with "
                  f"{threads} torch thread(s) each")
        executor = local_executor(plan.gdir / SUBMITIT_DIR, plan.grid.resources)
        # the largest groups first: the last jobs to start are the short ones
        order = sorted(range(len(plan.groups)), key=lambda g: -len(plan.groups[g]))
        jobs = self._jobs(threads)

        def started(k: int, job: submitit.Job) -> None:
            self._record(plan.groups[order[k]], job.job_id, "local", Path(job.paths.folder))

        try:
            run_local(executor, [jobs[g] for g in order], concurrency, on_start=started, on_tick=on_tick, poll_s=poll_s,
                      log=plan.gdir / SUBMITIT_DIR / "local-controllers.log")
        except KeyboardInterrupt:  # the jobs have exited: what they could not record, this records
            mark_unfinished([plan.gdir / c.folder for c in plan.cells], CellState.REQUEUED,
                            "interrupted (Ctrl-C): resumes from its last checkpoint with the next `ablate`")
            raise

    def debug(self) -> None:
        """In this process, one job after another (a debugger stops at the failure)."""
        self._supersede()

        def started(g: int, job: submitit.Job) -> None:
            self._record(self.plan.groups[g], f"debug-{os.getpid()}", "debug", None)

        run_debug(self.plan.gdir / SUBMITIT_DIR, self._jobs(0), on_start=started)

    def _supersede(self) -> None:
        """The cells' previous state (failed, requeued) is over the moment they are resubmitted: a
        parent run or a progress line never reads it as this attempt's."""
        for cell in self.plan.cells:
            write_status(self.plan.gdir / cell.folder, CellState.PENDING)

    def _jobs(self, threads: int) -> list[GroupJob]:
        plan = self.plan
        return [GroupJob(configs=[plan.cells[i].config.to_dict() for i in group],
                         run_dirs=[str(plan.gdir / plan.cells[i].folder) for i in group], workdir=os.getcwd(),
                         store=self.store.model_dump() if self.store else None,
                         tracking_run_ids=[self.launches[i].tracking_run_id for i in group], threads=threads)
                for group in plan.groups]

    def _record(self, group: Sequence[int], job_id: str, executor: str, log_dir: Path | None) -> None:
        """Every cell of a group job records the job (each cell's own launch record)."""
        for i in group:
            self.launches[i] = record_submission(self.plan.gdir, self.plan.cells[i], self.launches[i], job_id,
                                                 executor, log_dir, group_size=len(group))


def record_submission(gdir: Path, cell: Cell, launch: LaunchRecord, job_id: str, executor: str,
                      log_dir: Path | None, group_size: int = 1) -> LaunchRecord:
    """``launch`` with the submission added (a queued local cell's placeholder replaced), written."""
    cell_dir = gdir / cell.folder
    earlier = launch.submissions
    if earlier and earlier[-1].job_id.startswith(QUEUED_PREFIX):  # a queued local cell starts
        earlier = earlier[:-1]
    submission = Submission(job_id=job_id, executor=executor, host=socket.gethostname(), submitted_at=time.time(),
                            log_dir=str(log_dir) if log_dir else None, group_size=group_size)
    launch = launch.model_copy(update={"submissions": [*earlier, submission]})
    write_record(cell_dir / LAUNCH_FILE, launch)
    if log_dir is not None:
        link_logs(cell_dir, log_dir)
    return launch


def jobs_text(groups: Sequence[Sequence[int]]) -> str:
    """``3 jobs (2 groups sharing data and teacher, of 8 and 4 cells; 1 alone)``."""
    shared = sorted((len(g) for g in groups if len(g) > 1), reverse=True)
    alone = len(groups) - len(shared)
    if not shared:
        return f"{len(groups)} job(s), one per cell"
    parts = [f"{len(shared)} group(s) sharing data and teacher, of {', '.join(map(str, shared))} cells"]
    return f"{len(groups)} job(s) ({'; '.join(parts + ([f'{alone} alone'] if alone else []))})"


def clear_for_restart(cell_views: Sequence[CellView], echo: Echo) -> None:
    """--force: cancel the cells' active jobs, then remove their folders (fresh runs)."""
    active = [v for v in cell_views if v.job_alive]
    local = [v for v in active if v.record and v.record.last and v.record.last.executor != "slurm"]
    if local:
        raise UserError(f"{len(local)} cell(s) run locally under another ablate (e.g. {local[0].folder}): "
                        "stop it before --force")
    ids = [s.job_id for v in active for s in v.record.submissions if s.executor == "slurm"]
    if ids:
        echo(f"--force: cancelling {len(ids)} active job(s)")
        slurm.cancel(ids)
        # a cancelled job lives until SIGKILL (KillWait): wait, or it writes into the new folder
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = slurm.job_states(ids)
            if all(s.finished or s.state == "UNKNOWN" for s in states.values()):
                break
            time.sleep(1)
    for v in cell_views:
        if v.folder.exists():
            shutil.rmtree(v.folder)
