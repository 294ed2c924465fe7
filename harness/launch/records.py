"""What ``ablate`` writes beside the runs, so that ``status`` never needs the scheduler's history.

Layout under the runs folder (default ``runs/``)::

    runs/<grid>/grid.json            the latest ablate: grid file, store, parent run, executor,
                                     the cells it covers (folders)
    runs/<grid>/<cell folder>/       the run folder (harness.run.folder) plus
        launch.json                  the cell: ids, axis values, MLflow run, every submission
        logs -> ../.submitit/<job>   the latest submission's submitit/Slurm logs
    runs/<grid>/.submitit/<job id>/  submitit's pickles and logs (one folder per job)

Records are pydantic models written atomically as JSON.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock
from pydantic import BaseModel, ConfigDict, ValidationError

from harness.run.cell_state import CellState
from harness.core.files import write_atomic
from harness.run.folder import read_status
from harness.tracking import Store, run_state, set_state

log = logging.getLogger(__name__)

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
    group_size: int = 1  # the cells the job trains together (sharing data and teacher), this one included


class LaunchRecord(_Record):
    grid: str
    name: str
    run_id: str
    cell_id: str
    seed: int
    axes: dict[str, Any]
    store: Store | None = None
    tracking_run_id: str | None = None
    submissions: list[Submission] = []

    @property
    def last(self) -> Submission | None:
        return self.submissions[-1] if self.submissions else None


class GridRecord(_Record):
    grid: str
    experiment: str  # the MLflow experiment holding the grid's runs
    grid_file: str | None
    executor: str
    store: Store | None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    submitted_at: float
    folders: list[str]  # the grid's cells, grid order
    submitted: list[str] = []  # the cells this invocation (its parent run) submitted


R = TypeVar("R", bound=_Record)


def write_record(path: Path, record: _Record) -> None:
    write_atomic(path, record.model_dump_json(indent=2))


def read_record(path: Path, kind: type[R]) -> R | None:
    """The record at ``path``, or None when it is missing or unreadable (never raises)."""
    try:
        return kind.model_validate_json(path.read_text())
    except (OSError, ValidationError, ValueError):
        return None


def grid_dir(runs_dir: Path, grid: str) -> Path:
    return Path(runs_dir) / grid


def link_logs(cell_dir: Path, log_dir: Path) -> None:
    """Point ``<cell>/logs`` at the latest job's log folder (relative, so runs/ can move)."""
    link = cell_dir / LOGS_LINK
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    with contextlib.suppress(OSError):  # filesystems without symlinks: launch.json has the path
        link.symlink_to(os.path.relpath(log_dir, cell_dir))


def grid_lock(directory: Path) -> FileLock:
    """Serialises the commands that rewrite a grid's records (two ``ablate`` of one grid, a job
    ending the parent run)."""
    directory.mkdir(parents=True, exist_ok=True)
    return FileLock(directory / ".lock", is_singleton=True)  # one object per path: re-entrant in a process


def close_parent_if_settled(gdir: Path, superseded: bool = False) -> bool:
    """End the latest ``ablate``'s parent run once every cell it submitted has ended (FAILED, with
    the count, when any failed), or at once when a later ``ablate`` takes its cells over
    (``superseded``: FAILED when some had not ended). Called by whoever settles a cell; True when
    the run was ended. A store that cannot be reached leaves it for the next caller."""
    record = read_record(gdir / GRID_FILE, GridRecord)
    if record is None or record.store is None or not record.parent_run_id:
        return False
    states = [CellState.parse(read_status(gdir / folder).get("state")) for folder in record.submitted or record.folders]
    unfinished = sum(s is None or not s.terminal for s in states)
    if unfinished and not superseded:
        return False
    failed = sum(s == CellState.FAILED for s in states)
    reason = "; ".join(([f"{failed} of {len(states)} cells failed"] if failed else []) +
                       ([f"{unfinished} of {len(states)} cells had not ended when a later ablate took them over"]
                        if unfinished else []))
    uri = record.store.writer_uri() or record.store.backend
    try:
        with grid_lock(gdir):
            if not run_state(uri, record.parent_run_id).terminal:
                set_state(uri, record.parent_run_id, CellState.FAILED if reason else CellState.DONE, reason or None)
    except Exception as err:  # noqa: BLE001 - the store is down: the next ablate ends it
        log.warning("could not end the parent run %s: %s", record.parent_run_id, err)
        return False
    return True
