"""The job that runs a group of cells (one cell alone, or several that share data and teacher:
:mod:`harness.config.student_side`), under any submitit executor (Slurm, local, debug).

A :class:`GroupJob` is pickled by submitit and called on the compute node. It holds plain data
only (the configs as dicts, paths, the grid's store and the cells' MLflow run ids, which
``ablate`` created before submission), so it unpickles with nothing but the harness installed.

* Every rank holds its lock on each run folder for the job's whole life: a duplicate job for a
  cell exits at once and touches nothing (:func:`harness.run.folder.hold`).
* Rank 0 runs one :class:`~harness.tracking.sync.Mirror` that copies each cell's folder into its
  MLflow run in the background; an unreachable server never stops training.
* Stopped by the scheduler (``scontrol requeue``, preemption: SIGTERM to every process; the time
  limit: submitit turns USR2 into a call of :meth:`checkpoint` and a requeue), every unfinished
  cell records ``requeued``, never ``failed``. The requeued job (same Slurm id) calls this object
  again and :func:`harness.run.run_group` continues each student from its own
  ``checkpoints/latest.pt`` in the same folder and MLflow run.
* The job that settles the last cell of an ``ablate`` ends that invocation's parent run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from harness.config import RunConfig, parse_config
from harness.launch.records import close_parent_if_settled
from harness.run.cell_state import CellState
from harness.run.folder import (METRICS_FILE, SchedulerStopWatch, check_owner, failure_reason, hold, job_id_here,
                                mark_unfinished, stopped_by_scheduler)
from harness.tracking import Mirror, Store, limit_http
from harness.train.metrics_log import JsonlLogger

log = logging.getLogger(__name__)


@dataclass
class GroupJob(submitit.helpers.Checkpointable):
    """The job of one group of cells (a cell alone is a group of one): they pretrain on one data
    stream and one teacher forward per batch (:func:`harness.run.run_group`), each in its own folder."""

    configs: list[dict[str, Any]]  # RunConfig.to_dict() per cell
    run_dirs: list[str]  # absolute, one per cell
    workdir: str  # the submitting directory: relative paths in the configs start here
    store: dict[str, Any] | None = None  # harness.tracking.Store, as a dict
    tracking_run_ids: list[str | None] | None = None  # one per cell
    threads: int | None = None  # torch intra-op threads (the CPUs given to each task)

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.workdir)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # One process per task (GPU); harness.core.distributed joins the group from these.
            # Every task keeps all of the node's GPUs visible: it picks cuda:LOCAL_RANK itself.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfgs = [parse_config(c, source=f"job {d}") for c, d in zip(self.configs, self.run_dirs)]
        for cfg, run_dir in zip(cfgs, self.run_dirs):  # a folder of another config's run: touched by no one
            check_owner(Path(run_dir), cfg.run_id())
        # a folder another live job holds makes this job a duplicate: it exits touching nothing
        with contextlib.ExitStack() as held:
            for run_dir in self.run_dirs:
                held.enter_context(hold(Path(run_dir), env.global_rank))
            return self._run(cfgs, main=env.global_rank == 0)

    def _run(self, cfgs: list[RunConfig], *, main: bool) -> dict[str, Any]:
        """Run the group; only the main rank writes status and mirrors each cell to MLflow."""
        # the training code (torch, timm, open_clip: seconds of imports) is imported on the node only,
        # never by the ablate process that pickles this job
        import torch

        from harness.run.runner import run_group

        if self.threads:
            torch.set_num_threads(self.threads)
        run_dirs = [Path(d) for d in self.run_dirs]
        job = {"job": job_id_here(), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}

        def stopping(signal_name: str) -> None:  # the scheduler's SIGTERM: record it at once
            mark_unfinished(self.run_dirs, CellState.REQUEUED, f"stopped by the scheduler ({signal_name})")

        try:
            with SchedulerStopWatch(on_stop=stopping if main else None) as watch, self._mirror(run_dirs, main):
                try:
                    results = run_group(cfgs, run_dirs, [JsonlLogger(d / METRICS_FILE) for d in run_dirs],
                                        job_fields=job)
                except Exception as err:
                    if main:
                        why = stopped_by_scheduler(err, watch)
                        mark_unfinished(self.run_dirs, CellState.REQUEUED if why else CellState.FAILED,
                                        why or failure_reason(err))
                    raise
        finally:  # done or failed, these cells may be the last of their ablate to settle
            if main and self.store and self.tracking_run_ids:
                close_parent_if_settled(run_dirs[0].parent)
        return {d.name: {"state": r.state.value, "metrics": r.metrics, "reason": r.failure_reason}
                for d, r in zip(run_dirs, results)}

    def _mirror(self, run_dirs: list[Path], main: bool) -> contextlib.AbstractContextManager[Any]:
        runs = [(d, run_id) for d, run_id in zip(run_dirs, self.tracking_run_ids or []) if run_id]
        if not (main and self.store and runs):
            return contextlib.nullcontext()
        limit_http()  # the mirror tries again on its next round: training never waits on the server
        return Mirror(runs, Store(**self.store).writer_uri)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (time limit or preemption), on global rank 0 only."""
        try:
            mark_unfinished(self.run_dirs, CellState.REQUEUED,
                            "time limit or preemption (USR2): requeued, resumes from its last checkpoint")
        except Exception as err:  # noqa: BLE001 - never block the requeue on bookkeeping
            log.warning("could not record the requeue of %s: %s", self.run_dirs, err)
        return super().checkpoint(*args, **kwargs)
