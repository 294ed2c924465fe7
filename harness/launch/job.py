"""The job that runs one cell, under any submitit executor (Slurm, local, debug).

A :class:`CellJob` is pickled by submitit and called on the compute node. It holds plain data
only (the config as a dict, paths, the tracking URI and the cell's MLflow run id, which
``ablate`` created before submission), so it unpickles with nothing but the harness installed.

Preemption and time limits: submitit turns Slurm's USR2 into a call of :meth:`checkpoint`,
which marks the run requeued and returns a resubmission of this same object; the requeued
job (same Slurm id, ``SLURM_RESTART_COUNT`` + 1) calls it again and :func:`harness.run.run`
continues from ``checkpoints/latest.pt`` in the same run folder, logging into the same MLflow
run without repeating or skipping steps. An outside ``scontrol requeue`` (or a node failure)
kills the job without that call; the restart resumes the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

log = logging.getLogger(__name__)


class NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 writes the run's history)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def last_step(self, key: str) -> int | None:
        return None

    def flush(self) -> None:
        pass


@dataclass
class CellJob(submitit.helpers.Checkpointable):
    config: dict[str, Any]  # RunConfig.to_dict()
    run_dir: str  # absolute
    workdir: str  # the submitting directory: relative paths in the config start here
    tracking_uri: str | None = None
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
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                   overwrite=True)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        cfg = parse_config(self.config, source=f"job {self.run_dir}")
        if env.global_rank != 0:
            return self._run(cfg, NullLogger(), main=False)
        return self._run(cfg, self._logger(), main=True)

    @property
    def tracked(self) -> bool:
        return bool(self.tracking_uri and self.mlflow_run_id)

    def _logger(self) -> Any:
        from harness.train.metrics_log import JsonlLogger

        path = Path(self.run_dir) / "metrics.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.tracked:
            return JsonlLogger(path)
        from harness.tracking import CellLogger

        return CellLogger(path, self.tracking_uri, self.mlflow_run_id)

    def _run(self, cfg: Any, logger: Any, *, main: bool) -> dict[str, Any]:
        """Run the cell; only the main rank (``main``) writes status and tracking."""
        from harness.run import run, set_status

        run_dir = Path(self.run_dir)
        uri, run_id = self.tracking_uri, self.mlflow_run_id
        tracked = main and self.tracked
        if tracked:
            import harness.tracking as tracking

            tracking.mark_run(uri, run_id, "running")
            tracking.set_run_tags(uri, run_id, tracking.job_tags())
        try:
            with tracking.system_metrics(uri, run_id) if tracked else contextlib.nullcontext():
                result = run(cfg, run_dir, logger)
        except Exception as err:
            # harness.run records TrainingFailed itself; anything else (a crash, out of memory,
            # "timed-out too many times") must not leave the folder saying "running".
            reason = f"{type(err).__name__}: {err}"
            if main:
                set_status(run_dir, "failed", reason=reason)
            if tracked:
                tracking.mark_run(uri, run_id, "failed", reason)
            raise
        if tracked:
            if result.state == "done":
                tracking.log_summary_metrics(uri, run_id, result.metrics, step=_read_steps(run_dir))
                tracking.log_cell_artifacts(uri, run_id, cfg=cfg, run_dir=run_dir,
                                            checkpoint=run_dir / "checkpoints" / "latest.pt")
            tracking.mark_run(uri, run_id, result.state, result.failure_reason)
        return {"state": result.state, "metrics": result.metrics, "reason": result.failure_reason}

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 (preemption or time limit), on global rank 0 only."""
        reason = "preempted or reached its time limit: requeued, resumes from its last checkpoint"
        try:
            from harness.run import set_status

            set_status(Path(self.run_dir), "requeued", reason=reason)
            if self.tracked:
                import harness.tracking as tracking

                tracking.mark_run(self.tracking_uri, self.mlflow_run_id, "requeued", reason)
        except Exception as err:  # noqa: BLE001 - never block the requeue on bookkeeping
            log.warning("could not record the requeue of %s: %s", self.run_dir, err)
        return super().checkpoint(*args, **kwargs)


def _read_steps(run_dir: Path) -> int:
    from harness.run import read_json

    return int((read_json(run_dir / "results.json") or {}).get("steps", 0))
