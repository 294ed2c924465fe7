"""The job that runs one cell, under any submitit executor (Slurm, local, debug).

A :class:`CellJob` is pickled by submitit and called on the compute node. It holds plain data
only (the config as a dict, paths, the grid's store and the cell's MLflow run id, which
``ablate`` created before submission), so it unpickles with nothing but the harness installed.

* Every rank holds its lock on the run folder for the job's whole life: a duplicate job for the
  cell exits at once and touches nothing (:func:`harness.run_folder.hold`).
* Rank 0 runs a :class:`~harness.tracking.sync.Mirror` that copies the folder into the MLflow
  run in the background; an unreachable server never stops training.
* Stopped by the scheduler (``scontrol requeue``, preemption: SIGTERM to every process; the time
  limit: submitit turns USR2 into a call of :meth:`checkpoint` and a requeue), the run records
  ``requeued``, never ``failed``. The requeued job (same Slurm id) calls this object again and
  :func:`harness.run.run` continues from ``checkpoints/latest.pt`` in the same folder and MLflow run.
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

from harness.cell_state import CellState
from harness.run_folder import METRICS_FILE, StopWatch, hold, job_id_here, stopped_by_scheduler, write_status

log = logging.getLogger(__name__)

# A job gives up on an unreachable tracking server quickly (MLflow's client retries for minutes
# by default): the mirror tries again on its next round, and training never waits on it.
_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
                "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


@dataclass
class CellJob(submitit.helpers.Checkpointable):
    config: dict[str, Any]  # RunConfig.to_dict()
    run_dir: str  # absolute
    workdir: str  # the submitting directory: relative paths in the config start here
    store: dict[str, Any] | None = None  # harness.tracking.store.Store, as a dict
    mlflow_run_id: str | None = None
    threads: int | None = None  # torch intra-op threads (the CPUs given to each task)

    def __call__(self) -> dict[str, Any]:
        from harness.config import parse_config

        os.chdir(self.workdir)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # One process per task (GPU); harness.train.distributed joins the group from these.
            # Every task keeps all of the node's GPUs visible: it picks cuda:LOCAL_RANK itself.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        cfg = parse_config(self.config, source=f"job {self.run_dir}")
        with hold(Path(self.run_dir), env.global_rank):
            return self._run(cfg, main=env.global_rank == 0)

    def _run(self, cfg: Any, *, main: bool) -> dict[str, Any]:
        """Run the cell; only the main rank writes status and mirrors it to MLflow."""
        from harness.run import run
        from harness.train.metrics_log import JsonlLogger

        run_dir = Path(self.run_dir)
        job = {"job": job_id_here(), "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}

        def stopping(signal_name: str) -> None:  # the scheduler's SIGTERM: record it at once
            write_status(run_dir, CellState.REQUEUED, reason=f"stopped by the scheduler ({signal_name})")

        try:
            with StopWatch(on_stop=stopping if main else None) as watch, self._mirror(run_dir, main):
                try:
                    result = run(cfg, run_dir, JsonlLogger(run_dir / METRICS_FILE), job_fields=job)
                except Exception as err:
                    if main:
                        why = stopped_by_scheduler(err, watch)
                        write_status(run_dir, CellState.REQUEUED if why else CellState.FAILED,
                                     reason=why or f"{type(err).__name__}: {err}")
                    raise
        finally:  # done or failed, this cell may be the last of its ablate to settle
            if main and self.store and self.mlflow_run_id:
                from harness.launch.records import close_parent_if_settled

                close_parent_if_settled(run_dir.parent)
        return {"state": result.state.value, "metrics": result.metrics, "reason": result.failure_reason}

    def _mirror(self, run_dir: Path, main: bool) -> contextlib.AbstractContextManager[Any]:
        if not (main and self.store and self.mlflow_run_id):
            return contextlib.nullcontext()
        from harness.tracking.store import Store
        from harness.tracking.sync import Mirror

        for name, value in _HTTP_LIMITS.items():
            os.environ.setdefault(name, value)
        return Mirror(run_dir, Store(**self.store).writer_uri, self.mlflow_run_id)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (time limit or preemption), on global rank 0 only."""
        try:
            write_status(Path(self.run_dir), CellState.REQUEUED,
                         reason="time limit or preemption (USR2): requeued, resumes from its last checkpoint")
        except Exception as err:  # noqa: BLE001 - never block the requeue on bookkeeping
            log.warning("could not record the requeue of %s: %s", self.run_dir, err)
        return super().checkpoint(*args, **kwargs)
