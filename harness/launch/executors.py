"""submitit executors for a grid's resources, and running jobs through them.

* ``slurm``: the cells to (re)submit go out as ONE job array, throttled by
  ``resources.array_parallelism``, one task per GPU (CPU cells may ask for several tasks).
* ``local``: processes on this machine; :func:`run_local` keeps at most ``concurrency`` running
  (submitit's LocalExecutor would start every job at once), each with its share of the cores.
* ``debug``: in this process, one after another (a debugger stops at the failure).

Nothing waits on a Slurm job's ``result()``: without ``sacct`` it blocks forever for a job that died
before writing its result (see :mod:`harness.launch.slurm`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import submitit

from harness.core.errors import UserError
from harness.grid import Resources
from harness.launch.slurm import slurm_available

EXECUTORS = ("auto", "local", "slurm", "debug")


def resolve_executor(name: str) -> str:
    """``auto``: slurm when a controller answers ``sinfo``, else local."""
    if name not in EXECUTORS:
        raise UserError(f"unknown executor {name!r}: use one of {', '.join(EXECUTORS)}")
    if name != "auto":
        return name
    return "slurm" if slurm_available() else "local"


# Time-limit requeues a job may take, per cell it trains (submitit's own default for one job).
TIMEOUTS_PER_CELL = 3


def timeout_allowance(cells_per_job: int, periods: int | None = None) -> int:
    """Time-limit requeues submitit may make of a job: 3 per cell it trains (a job that trains
    several cells in turn runs that many times longer), and, when the dry-run estimate says how
    many time-limit periods the job spans, at least twice that (the estimate assumes a
    throughput; every requeue resumes from the last checkpoint, so a long job still progresses)."""
    return max(TIMEOUTS_PER_CELL * cells_per_job, 2 * periods if periods else 0)


def slurm_executor(folder: Path, resources: Resources, job_name: str, max_timeouts: int) -> submitit.AutoExecutor:
    """An AutoExecutor for Slurm; ``folder`` gets one sub-folder per job (``%j``); a job may hit the
    time limit, and requeue itself, ``max_timeouts`` times (:func:`timeout_allowance`)."""
    r = resources
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm",
                                     slurm_max_num_timeout=max_timeouts)
    optional = {"gpus_per_node": r.gpus_per_node or None, "mem_gb": r.mem_gb, "slurm_partition": r.partition,
                "slurm_account": r.account, "slurm_qos": r.qos, "slurm_constraint": r.constraint,
                "slurm_array_parallelism": r.array_parallelism, "slurm_setup": list(r.setup) or None}
    # --requeue (submitit passes none): Slurm may requeue the job (preemption, node failure), and so may submitit
    executor.update_parameters(name=job_name, timeout_min=r.time_min, nodes=r.nodes, tasks_per_node=r.tasks,
                               cpus_per_task=r.cpus_per_task,
                               slurm_additional_parameters={"requeue": True, **r.slurm_extra},
                               **{k: v for k, v in optional.items() if v is not None})
    return executor


def local_executor(folder: Path, resources: Resources) -> submitit.LocalExecutor:
    r = resources
    if r.nodes > 1:
        raise UserError(f"the local executor runs on one node but the grid asks for resources.nodes={r.nodes}: "
                        "use --executor slurm")
    executor = submitit.LocalExecutor(folder=folder / "%j")
    executor.update_parameters(timeout_min=r.time_min, tasks_per_node=r.tasks, gpus_per_node=r.gpus_per_node)
    if r.setup:
        executor.update_parameters(setup=list(r.setup))
    return executor


def local_slots(resources: Resources, cores: int | None = None) -> tuple[int, int]:
    """(jobs at once, torch threads per task): as many ``tasks x cpus_per_task`` jobs as fit in the
    cores (at least one), without oversubscribing."""
    cores = cores or len(os.sched_getaffinity(0))
    tasks, cpus = resources.tasks, resources.cpus_per_task
    return max(1, cores // (tasks * cpus)), max(1, min(cpus, cores // tasks))


def submit_array(executor: submitit.Executor, jobs: Sequence[Callable[[], Any]]) -> list[submitit.Job]:
    """Submit callables as one Slurm job array (job ids ``<array>_<i>``)."""
    with executor.batch():
        return [executor.submit(job) for job in jobs]


def run_local(executor: submitit.LocalExecutor, jobs: Sequence[Callable[[], Any]], concurrency: int,
              on_start: Callable[[int, submitit.Job], None], log: Path,
              on_tick: Callable[[], None] = lambda: None, poll_s: float = 1.0) -> None:
    """Run ``jobs`` as local processes, at most ``concurrency`` at a time, until all end;
    ``on_start(i, job)`` as job ``i`` starts, ``on_tick()`` after each poll. Any exception (Ctrl-C
    too) cancels the running jobs and returns once they have exited. submitit's process that runs a
    local job writes to ``log`` (a Ctrl-C made each print a traceback on the terminal); the job's own
    output goes to its log files as before."""
    queue = list(enumerate(jobs))
    running: list[submitit.Job] = []
    try:
        while queue or running:
            while queue and len(running) < concurrency:
                index, job = queue.pop(0)
                with _output_to(log):
                    started = executor.submit(job)
                on_start(index, started)
                running.append(started)
            time.sleep(poll_s)
            running = [j for j in running if not j.done()]  # a process poll: never blocks
            on_tick()
    except BaseException:
        for job in running:
            job.cancel(check=False)
        psutil.wait_procs([p for p in map(_process, running) if p is not None], timeout=60)
        raise


def _process(job: submitit.Job) -> psutil.Process | None:
    with contextlib.suppress(psutil.Error, ValueError):
        return psutil.Process(int(job.job_id))  # a local job's id is its process id
    return None


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """Processes started in the block write their stdout and stderr to ``path`` (they inherit the
    descriptors); this process's own are restored after."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as target:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def run_debug(folder: Path, jobs: Sequence[Callable[[], Any]], on_start: Callable[[int, submitit.Job], None]) -> None:
    """Run ``jobs`` in this process, one after another, stopping at the first failure."""
    executor = submitit.DebugExecutor(folder=folder / "debug")
    for index, job in enumerate(jobs):
        on_start(index, started := executor.submit(job))
        started.result()

