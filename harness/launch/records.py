"""What ``ablate`` writes beside the runs, so that status never needs the scheduler's history.

Layout under the runs folder (default ``runs/``)::

    runs/<grid>/grid.json            the latest ablate: grid file, tracking store, parent run,
                                     executor, the cells it covers (folders)
    runs/<grid>/<cell folder>/       the run folder harness.run writes (status.json, ...)
        launch.json                  the cell: ids, axis values, MLflow run, every submission
                                     (job id, executor, host, log folder)
        logs -> ../.submitit/<job>   the latest submission's submitit/Slurm logs
    runs/<grid>/.submitit/<job id>/  submitit's pickles and logs (one folder per job)

Records are pydantic models written atomically as JSON.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.filelock import exclusive_lock

LAUNCH_FILE = "launch.json"
GRID_FILE = "grid.json"
SUBMITIT_DIR = ".submitit"
LOGS_LINK = "logs"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Submission(_Record):
    job_id: str  # Slurm "<array>_<index>" or a plain id; the pid for local jobs
    executor: str  # slurm | local | debug
    host: str  # where it was submitted from (local jobs run there)
    submitted_at: float
    log_dir: str | None = None  # submitit folder holding the job's .out/.err


class LaunchRecord(_Record):
    grid: str
    name: str
    run_id: str
    cell_id: str
    seed: int
    axes: dict[str, Any]
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    submissions: list[Submission] = []

    @property
    def last(self) -> Submission | None:
        return self.submissions[-1] if self.submissions else None


class GridRecord(_Record):
    grid: str
    experiment: str  # the MLflow experiment holding the grid's runs
    grid_file: str | None
    executor: str
    tracking_uri: str | None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    parent_finished: bool = False  # the parent run was ended (all cells over)
    submitted_at: float
    folders: list[str]  # the cells of this ablate invocation, grid order
    axes: list[dict[str, Any]] = []  # [{"name", "values", "baseline"}]
    paper_setting: bool = False


R = TypeVar("R", bound=_Record)


def write_record(path: Path, record: _Record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    os.replace(tmp, path)


def read_record(path: Path, kind: type[R]) -> R | None:
    """The record at ``path``, or None when it is missing or unreadable (never raises)."""
    try:
        return kind.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None


def grid_dir(runs_dir: Path, grid: str) -> Path:
    return Path(runs_dir) / grid


def new_submission(job_id: str, executor: str, log_dir: Path | None) -> Submission:
    return Submission(job_id=job_id, executor=executor, host=socket.gethostname(),
                      submitted_at=time.time(), log_dir=str(log_dir) if log_dir else None)


def link_logs(cell_dir: Path, log_dir: Path) -> None:
    """Point ``<cell>/logs`` at the latest job's log folder (relative, so runs/ can move)."""
    link = cell_dir / LOGS_LINK
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    with contextlib.suppress(OSError):  # filesystems without symlinks: launch.json has the path
        link.symlink_to(os.path.relpath(log_dir, cell_dir))


def grid_lock(directory: Path) -> contextlib.AbstractContextManager[None]:
    """Serialise ablate invocations on one grid folder (they read and rewrite its records)."""
    return exclusive_lock(directory / ".lock")
