"""``ablate``'s second step: register the planned cells before any job starts. The grid's tracking
store is chosen (and served to Slurm jobs), what settled cells still owe it is sent, the previous
invocation's parent run is ended when a new one takes its cells over, this invocation's parent
run and each cell's run are made (a resubmitted cell keeps its own run), and every cell's launch
record and the grid's record are written (:mod:`.records`).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config import format_value
from harness.grid import Cell, Grid
from harness.launch.cell_views import CellView
from harness.launch.plan import Plan
from harness.launch.records import (GRID_FILE, LAUNCH_FILE, GridRecord, LaunchRecord, close_parent_if_settled,
                                    read_record, write_record)
from harness.run.cell_state import CellState
from harness.tracking import (ARTIFACTS_DIR, DB_NAME, Store, bounded_http, check_store, create_cell_runs,
                              SERVER_DIR, default_tracking_uri, ensure_server, per_run, prepare_store, schema, set_state,
                              sqlite_path, sqlite_uri, start_parent_run, store_writes, sync_run)

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Registration:
    """The grid's record (its store, experiment and parent run) and the launch record of each cell
    to submit, in the plan's order."""

    record: GridRecord
    launches: list[LaunchRecord]


def open_store(plan: Plan, *, tracking_uri: str | None, runs_dir: Path, echo: Echo) -> Store:
    """The grid's store, checked (and served to Slurm jobs), with what settled cells still owe it sent:
    before anything of the grid's is changed, so a store that cannot be used loses nothing."""
    previous = read_record(plan.gdir / GRID_FILE, GridRecord)
    if plan.todo or previous is None or previous.store is None:
        store = _choose_store(plan.grid, plan.executor, tracking_uri, runs_dir, echo)
    else:
        store = _keep_store(previous.store, echo)
    send_backlog(plan.views, store, echo)
    return store


def register(plan: Plan, store: Store, *, options: str, margin: float | None, reuse_runs: bool) -> Registration:
    """Everything ``ablate`` writes before it submits, in ``store`` (:func:`open_store`); ``options``
    are the command line's changes to the grid (:func:`grid_options`), ``reuse_runs`` False gives
    restarted cells fresh runs."""
    with store_writes(store.writer_uri() or store.backend):
        return _register(plan, store, options=options, margin=margin, reuse_runs=reuse_runs)


def _register(plan: Plan, store: Store, *, options: str, margin: float | None, reuse_runs: bool) -> Registration:
    grid, gdir = plan.grid, plan.gdir
    previous = read_record(gdir / GRID_FILE, GridRecord)
    same_store = previous is not None and previous.store == store
    if same_store:
        close_parent_if_settled(gdir, superseded=bool(plan.todo))  # a new parent takes the cells over
    record = GridRecord(grid=grid.name, experiment=grid.experiment, grid_file=str(grid.path) if grid.path else None,
                        executor=plan.executor, store=store, submitted_at=time.time(),
                        folders=[c.folder for c in grid.cells])
    if same_store:  # no cell to submit: the previous parent run stays the grid's
        record = record.model_copy(update={"experiment_id": previous.experiment_id,
                                           "parent_run_id": previous.parent_run_id, "submitted": previous.submitted})
    launches: list[LaunchRecord] = []
    if plan.todo:
        record = _start_parent(record, grid, plan.executor, options, margin or grid.spec.margin)
        record = record.model_copy(update={"submitted": [c.folder for c in plan.cells]})
        launches = _launch_records(gdir, plan.cells, record, plan.executor, reuse=reuse_runs)
    write_record(gdir / GRID_FILE, record)
    return Registration(record, launches)


def grid_options(sets: dict[str, Any], axes: dict[str, Sequence[Any]], rehearse: bool) -> str:
    """The command-line changes that made this grid (``--set``, ``--axis``, ``--rehearse``), as shell
    text: the report's ``--seeds`` command repeats them so that it names the same cells."""
    parts = [f"--set {shlex.quote(f'{key}={format_value(value)}')}" for key, value in sets.items()]
    parts += [f"--axis {shlex.quote(name + '=' + ','.join(format_value(v) for v in values))}"
              for name, values in axes.items()]
    return " ".join(parts + (["--rehearse"] if rehearse else []))


def _choose_store(grid: Grid, executor: str, tracking_uri: str | None, runs_dir: Path, echo: Echo) -> Store:
    """--tracking-uri, else the grid's, else SQLite in the cwd (local), or, for Slurm jobs, a
    SQLite store under the runs folder served over HTTP by an MLflow server on this host."""
    uri = tracking_uri or grid.spec.tracking.uri
    if uri is None and executor == "slurm":
        runs = runs_dir.absolute()
        return _keep_store(Store(backend=sqlite_uri(runs / DB_NAME), server_dir=str(runs / SERVER_DIR)), echo)
    store = Store(backend=uri or default_tracking_uri())
    check_store(store.backend)
    if executor == "slurm" and sqlite_path(store.backend) is not None:
        echo("warning: the jobs will all write to this SQLite file; on a cluster's shared filesystem that "
             "locks or corrupts: leave --tracking-uri unset to log through an MLflow server")
    return store


def _keep_store(store: Store, echo: Echo) -> Store:
    """The store the grid already uses; a served store gets its server (re)started when it is down."""
    if store.server_dir is None:
        check_store(store.backend)
        return store
    echo("MLflow server for the jobs: reusing or starting one (a start takes a while) ...")
    info = ensure_server(store.backend, Path(store.server_dir).parent / ARTIFACTS_DIR, store.server_dir)
    echo(f"MLflow server {info.url} ({'reused' if info.reused else 'started'}, process group {info.pgid}, "
         f"store {store.backend})")
    return store


def send_backlog(cell_views: Sequence[CellView], store: Store, echo: Echo) -> None:
    """Send the store what settled cells logged while it was unreachable (live jobs send their own)."""
    behind = [v for v in cell_views if v.backlog and not v.job_alive and v.record and v.record.tracking_run_id
              and v.record.store == store]
    if not behind:
        return
    uri = store.writer_uri() or store.backend
    try:
        with bounded_http(), store_writes(uri):
            for v in behind:
                sync_run(v.folder, uri, v.record.tracking_run_id)
    except Exception as err:  # noqa: BLE001 - what is not sent waits in the run folders
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        echo(f"warning: MLflow did not take what {len(behind)} finished cell(s) logged ({reason}); it waits in "
             "their run folders and goes out with the next `ablate`")
        return
    echo(f"sent MLflow what {len(behind)} finished cell(s) logged while it was unreachable")



def _start_parent(record: GridRecord, grid: Grid, executor: str, options: str, margin: float) -> GridRecord:
    """Store schema + experiment once, before any job; one parent run per invocation."""
    uri = record.store.writer_uri()
    experiment_id = prepare_store(uri, grid.experiment, description=schema.experiment_description(
        grid.name, grid.spec.description))
    parent = start_parent_run(uri, experiment_id, grid=grid.name, axes=grid.axes_spec(),
                              paper_setting=grid.spec.paper_setting,
                              tags={"executor": executor, "git_commit": schema.git_commit_of() or "unknown",
                                    schema.GRID_FILE_TAG: str(grid.path), schema.GRID_MARGIN: margin,
                                    schema.GRID_OPTIONS: options})
    return record.model_copy(update={"experiment_id": experiment_id, "parent_run_id": parent})


def _launch_records(gdir: Path, cells: Sequence[Cell], grid_record: GridRecord, executor: str,
                    reuse: bool) -> list[LaunchRecord]:
    """Each cell's launch record with its tracking run: the one it already has in this store (a
    resubmitted cell continues its own run, never a second one), else a new child run."""
    store, uri = grid_record.store, grid_record.store.writer_uri()
    olds = [read_record(gdir / c.folder / LAUNCH_FILE, LaunchRecord) if reuse else None for c in cells]

    def reused(old: LaunchRecord | None) -> str | None:
        if old is None or old.store is None or old.store.backend != store.backend or not old.tracking_run_id:
            return None
        try:
            set_state(uri, old.tracking_run_id, CellState.PENDING, tags={schema.EXECUTOR: executor})
        except Exception:  # noqa: BLE001 - the run is gone from the store: make a new one
            return None
        return old.tracking_run_id

    run_ids = per_run(uri, reused, olds)
    new = [i for i, run_id in enumerate(run_ids) if run_id is None]
    commit = schema.git_commit_of() or "unknown"  # once, not a git call per cell

    def spec(cell: Cell) -> dict[str, Any]:
        tags = schema.cell_tags(cell.config, grid=cell.grid, cell=cell.name, axis_values=cell.axis_values,
                                executor=executor, run_dir=gdir / cell.folder, git_commit=commit)
        return {"run_name": cell.run_name, "params": cell.config.flat(), "tags": tags}

    created = create_cell_runs(uri, grid_record.experiment_id, parent_run_id=grid_record.parent_run_id,
                               cells=[spec(cells[i]) for i in new])
    for i, run_id in zip(new, created):
        run_ids[i] = run_id
    records = []
    for cell, old, run_id in zip(cells, olds, run_ids):
        record = LaunchRecord(grid=cell.grid, name=cell.name, run_id=cell.run_id, cell_id=cell.cell_id,
                              seed=cell.seed, axes=cell.axis_values, store=store, tracking_run_id=run_id,
                              submissions=old.submissions if old else [])
        write_record(gdir / cell.folder / LAUNCH_FILE, record)
        records.append(record)
    return records
