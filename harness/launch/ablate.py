"""``bench.py ablate``: a grid -> preflight -> tracking runs -> jobs -> (optionally) wait.

The cells to (re)submit go out as group jobs: those that differ only on the student side train
together on one data stream and one teacher (:mod:`harness.config.student_side`; ``share=False``: one job per
cell). Idempotent: a done cell is skipped, a cell with any live job is left alone, any other is
(re)submitted (grouped again with the others resubmitted) and continues from its checkpoint in its
own folder and its own MLflow run;
``force`` cancels and restarts the chosen cells in fresh folders. Invocations of one grid are
serialised by the grid's lock, so two at the same moment submit each cell once. Slurm
submissions return at once unless asked to wait; local runs always wait. The CLI writes the
report afterwards (the report is a later stage than launching).
"""

from __future__ import annotations

import math
import os
import shutil
import shlex
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.run.cell_state import CellState
from harness.core.errors import UserError
from harness.grid import Cell, Grid, find_grid_file, load_grid
from harness.launch import display
from harness.launch.records import (
    GRID_FILE,
    LAUNCH_FILE,
    SUBMITIT_DIR,
    GridRecord,
    LaunchRecord,
    close_parent_if_settled,
    grid_dir,
    grid_lock,
    Submission,
    link_logs,
    read_record,
    write_record,
)
from harness.launch.cell_views import QUEUED_PREFIX, CellView, collect, plan
from harness.tracking.store import ARTIFACTS_DIR, DB_NAME, Store

Echo = Callable[[str], None]
DEFAULT_GRID = "smoke"
SERVER_DIR = ".mlflow-server"  # under the runs folder: the Slurm grids' MLflow server records itself here
POLL_S = {"slurm": 5.0, "local": 2.0}


@dataclass(frozen=True)
class AblateRequest:
    grid: str | None = None  # a path or a shipped grid name; None: the smoke grid, locally
    sets: Mapping[str, Any] = field(default_factory=dict)
    axes: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    seeds: int | None = None
    executor: str = "auto"
    dry_run: bool = False
    wait: bool = False
    force: bool = False
    tracking_uri: str | None = None
    runs_dir: Path = Path("runs")
    cells: tuple[str, ...] = ()  # only the cells whose folder or name contains one of these
    rehearse: bool = False  # the grid at micro scale, as <grid>-rehearsal (harness.grid.rehearsal); waits
    margin: float | None = None  # the verdicts' margin instead of the grid file's (recorded for later reports)
    share: bool = True  # cells that differ only on the student side train as one job (harness.config.student_side)


@dataclass
class AblateOutcome:
    grid: Grid
    executor: str
    submitted: list[Cell] = field(default_factory=list)
    views: list[CellView] = field(default_factory=list)  # final states when waited for
    record: GridRecord | None = None  # what this invocation recorded (its store and experiment)

    @property
    def waited(self) -> bool:
        return bool(self.views)

    @property
    def ok(self) -> bool:
        return all(v.state != CellState.FAILED for v in self.views)


def ablate(req: AblateRequest, echo: Echo = print) -> AblateOutcome:
    from harness.launch.executors import resolve_executor

    start = time.perf_counter()
    grid = load_grid(find_grid_file(req.grid or DEFAULT_GRID), sets=req.sets, axes=req.axes, seeds=req.seeds)
    executor = "local" if req.grid is None and req.executor == "auto" else resolve_executor(req.executor)
    if req.rehearse:
        grid = _rehearsal(grid, executor, req.runs_dir, echo)
        req = replace(req, wait=True)
    gdir = grid_dir(req.runs_dir, grid.name).absolute()
    chosen = _chosen(grid, req.cells)
    outcome = AblateOutcome(grid, executor)
    if req.dry_run:
        _dry_run(grid, gdir, executor, chosen, req, echo)
        return outcome
    with grid_lock(gdir):  # another ablate of this grid waits here, then finds these cells active
        batch = _prepare(grid, gdir, executor, chosen, req, echo)
        if batch.cells and executor == "slurm":
            _submit_slurm(grid, gdir, batch, echo)
    outcome.submitted, outcome.record = batch.cells, batch.record
    if executor == "slurm" and not req.wait:
        _how_to_follow(grid, gdir, req.runs_dir, echo)
        echo(f"ablate took {_elapsed(start, batch)}")
        return outcome
    progress = _Progress(gdir, [grid.cells[i] for i in chosen], echo)
    if batch.cells and executor == "local":
        _run_local(grid, gdir, batch, progress, echo)
    elif batch.cells and executor == "debug":
        _run_debug(gdir, batch)
    outcome.views = wait_for_cells(progress, POLL_S.get(executor, 2.0))
    _finish(gdir, batch.record, outcome.views, echo)
    echo(f"grid {grid.name} took {_elapsed(start, batch)}")
    return outcome


def _rehearsal(grid: Grid, executor: str, runs_dir: Path, echo: Echo) -> Grid:
    """The grid at micro scale (harness.grid.rehearsal), after the checks of the real grid that a
    rehearsal cannot make (its evaluation batches over its tasks)."""
    from harness.launch.preflight import check_settings
    from harness.grid.rehearsal import rehearse

    check_settings(grid)
    if executor == "slurm":
        from harness.launch import slurm

        cpus, gpus = slurm.node_shape(grid.resources.partition)
    else:
        import torch

        cpus, gpus = len(os.sched_getaffinity(0)), torch.cuda.device_count()
    rehearsal = rehearse(grid, runs_dir=runs_dir, cpu_only=gpus == 0, cpus_per_node=cpus or None)
    for note in rehearsal.notes:
        echo(f"rehearsal: {note}")
    return rehearsal.grid


def _chosen(grid: Grid, selectors: Sequence[str]) -> list[int]:
    """Indices of the cells ``--cell`` selects (all without it); an unmatched selector is an error."""
    if not selectors:
        return list(range(len(grid.cells)))
    chosen = [i for i, c in enumerate(grid.cells) if any(s in c.folder or s in c.run_name for s in selectors)]
    unmatched = [s for s in selectors if not any(s in c.folder or s in c.run_name for c in grid.cells)]
    if unmatched:
        raise UserError(f"--cell {unmatched[0]!r} matches no cell of grid {grid.name}: give part of a cell's "
                        f"folder or name, e.g. {grid.cells[0].folder!r} (see `bench.py ablate {grid.name} --dry-run`)")
    return chosen


def _elapsed(start: float, batch: _Batch) -> str:
    """Seconds since ``start``, the demo set-up (data, teacher) counted apart."""
    total = time.perf_counter() - start
    if batch.setup_seconds < 0.5:
        return f"{total:.1f} s"
    return f"{total - batch.setup_seconds:.1f} s, plus {batch.setup_seconds:.0f} s making the demo data and teacher"


@dataclass
class _Batch:
    """The cells one ablate (re)submits, with their launch records, and the grid record."""

    record: GridRecord
    cells: list[Cell]
    launches: list[LaunchRecord]
    groups: list[list[int]]  # indices into cells: each group is one job (harness.config.student_side)
    setup_seconds: float = 0.0  # making the demo data / teacher on first use


def _prepare(grid: Grid, gdir: Path, executor: str, chosen: Sequence[int], req: AblateRequest,
             echo: Echo) -> _Batch:
    """Plan, preflight, the store, tracking runs and launch records: everything before submission.
    Also what keeps the records whole: a dead server restarted, finished cells' MLflow backlog sent,
    the previous invocation's parent run ended when its cells have."""
    from harness.data.assets import ensure_demo_assets
    from harness.launch.preflight import preflight_grid

    now = collect([gdir / grid.cells[i].folder for i in chosen])
    todo = [i for i, v in zip(chosen, now) if plan(v, req.force) in ("submit", "restart")]
    echo(f"grid {grid.name}: {len(chosen)} cells ({display.counts(now)}); "
         f"{len(todo)} to {'restart' if req.force else 'submit'} with the {executor} executor")
    if req.force:
        _check_force_spares_other_cells(gdir, grid, [now[chosen.index(i)] for i in todo])
    setup_seconds = 0.0
    if todo:
        setup_seconds = ensure_demo_assets((grid.cells[i].config for i in todo), echo)
        preflight_grid(grid, executor, cache_dir=req.runs_dir)
    previous = read_record(gdir / GRID_FILE, GridRecord)
    store = _store(req, grid, executor, echo) if todo or previous is None or previous.store is None else \
        _keep_store(previous.store, echo)
    _backfill(now, store, echo)
    if previous is not None and previous.store == store:
        close_parent_if_settled(gdir, superseded=bool(todo))  # a new parent takes the cells over
    record = GridRecord(grid=grid.name, experiment=grid.experiment, grid_file=str(grid.path) if grid.path else None,
                        executor=executor, store=store, submitted_at=time.time(),
                        folders=[c.folder for c in grid.cells])
    if previous is not None and previous.store == store:
        record = record.model_copy(update={"experiment_id": previous.experiment_id,
                                           "parent_run_id": previous.parent_run_id})
    cells, launches = [grid.cells[i] for i in todo], []
    if todo:
        if req.force:
            _clear([now[chosen.index(i)] for i in todo], echo)
        record = _start_tracking(record, grid, executor, _grid_options(req), req.margin or grid.spec.margin)
        launches = _launch_records(gdir, cells, record, executor, reuse=not req.force)
    write_record(gdir / GRID_FILE, record)
    return _Batch(record, cells, launches, job_groups(cells, req.share, grid.resources.max_cells_per_job),
                  setup_seconds)


def job_groups(cells: Sequence[Cell], share: bool, max_cells: int | None = None) -> list[list[int]]:
    """Indices of ``cells`` per job: the cells that differ only on the student side together
    (harness.config.student_side), at most ``max_cells`` per job (a larger group is split evenly), or one job
    per cell without sharing."""
    from harness.config.student_side import group_by_share_key

    indices = list(range(len(cells)))
    if not share:
        return [[i] for i in indices]
    jobs = []
    for group in group_by_share_key(indices, [c.config for c in cells]):
        parts = -(-len(group) // max_cells) if max_cells else 1
        jobs += [group[k::parts] for k in range(parts)]
    return jobs


# --- steps ---------------------------------------------------------------------------------------

def _dry_run(grid: Grid, gdir: Path, executor: str, chosen: Sequence[int], req: AblateRequest, echo: Echo) -> None:
    from harness.launch.estimate import gpu_hours
    from harness.data.assets import DEMO_DATA, DEMO_TEACHER
    from harness.launch.preflight import preflight_grid

    views_now = collect([gdir / c.folder for c in grid.cells])
    actions = [plan(v, req.force) if i in chosen else "leave (not chosen)" for i, v in enumerate(views_now)]
    echo(f"grid {grid.name} ({grid.path}): {grid.spec.description.strip()}" if grid.spec.description
         else f"grid {grid.name} ({grid.path})")
    echo(f"executor {executor}; runs in {gdir}; nothing is submitted (dry run)")
    todo = [i for i, action in enumerate(actions) if action in ("submit", "restart")]
    groups = [[todo[k] for k in group] for group in job_groups([grid.cells[i] for i in todo], req.share,
                                                                grid.resources.max_cells_per_job)]
    job_of = {i: n for n, group in enumerate(groups, 1) for i in group}
    hours = gpu_hours(grid)
    echo(display.plan_table(grid, views_now, hours, actions, job_of))
    if todo:
        echo(_groups_line(grid, groups, req.share, [hours.get(grid.cells[i].run_id) for i in todo]))
        if executor == "slurm" and (line := job_time_limit(grid, grid.cells, groups, hours)[1]):
            echo(line)
    missing = [p for p in (DEMO_DATA, DEMO_TEACHER) if not p.exists()
               and any(str(p) in (c.config.data.root, c.config.teacher.pretrained) for c in grid.cells)]
    if missing:
        echo(f"preflight: skipped; {', '.join(map(str, missing))} would be made first")
        return
    preflight_grid(grid, executor)
    echo("preflight: ok")


def _groups_line(grid: Grid, groups: Sequence[Sequence[int]], share: bool, hours: Sequence[Any]) -> str:
    """The dry run's account of the jobs: how the cells group, and what the grouping saves
    (``hours``: the estimated GPU-hours of the cells to submit)."""
    from harness.launch.estimate import sharing_saving

    sizes = sorted((len(g) for g in groups if len(g) > 1), reverse=True)
    if not share:
        return f"{len(groups)} jobs, one per cell (--no-share)"
    if not sizes:
        return f"{len(groups)} jobs, one per cell: no two cells differ only on the student side"
    saving = sharing_saving(grid.cells, groups)
    text = (f"{len(groups)} jobs: {len(sizes)} group(s) of {', '.join(map(str, sizes))} cells train on one data "
            f"stream with one teacher forward per batch (column 'job'; --no-share: one job per cell); "
            f"{saving.summary()}")
    if hours and all(isinstance(h, float) for h in hours):  # every cell pretrains on the same data
        total = sum(hours)
        text += f"; about {total * (1 - saving.flops_saved):,.1f} GPU-hours of pretraining instead of {total:,.1f}"
    return text


def job_time_limit(grid: Grid, cells: Sequence[Cell], groups: Sequence[Sequence[int]],
                hours: dict[str, float | str | None]) -> tuple[int, str | None]:
    """The time-limit requeues submitit may make of each job of the array (``groups``: indices
    into ``cells``), and the dry run's account of the longest job against the time limit (None
    when its length cannot be estimated)."""
    from harness.launch.estimate import job_hours
    from harness.launch.executors import timeout_allowance

    r, most_cells = grid.resources, max(len(group) for group in groups)
    wall = job_hours(cells, groups, hours, r.gpus)
    if not wall:
        return timeout_allowance(most_cells), None
    longest = max(range(len(groups)), key=wall.__getitem__)
    periods = math.ceil(wall[longest] * 60 / r.time_min)
    allowed = timeout_allowance(most_cells, periods)
    return allowed, (f"longest job: {len(groups[longest])} cell(s), about {wall[longest]:,.1f} h of pretraining on "
                     f"{r.gpus} GPUs, so {periods} period(s) of the {r.time_min}-min time limit, each after the "
                     f"first a requeue from the last checkpoint; submitit may requeue each job {allowed} times")


def _store(req: AblateRequest, grid: Grid, executor: str, echo: Echo) -> Store:
    """--tracking-uri, else the grid's, else SQLite in the cwd (local), or, for Slurm jobs, a
    SQLite store under the runs folder served over HTTP by an MLflow server on this host."""
    from harness.tracking.store import check_store, default_tracking_uri, sqlite_path, sqlite_uri

    uri = req.tracking_uri or grid.spec.tracking.uri
    if uri is None and executor == "slurm":
        runs = req.runs_dir.absolute()
        return _keep_store(Store(backend=sqlite_uri(runs / DB_NAME), server_dir=str(runs / SERVER_DIR)), echo)
    store = Store(backend=uri or default_tracking_uri())
    check_store(store.backend)
    if executor == "slurm" and sqlite_path(store.backend) is not None:
        echo("warning: the jobs will all write to this SQLite file; on a cluster's shared filesystem that "
             "locks or corrupts: leave --tracking-uri unset to log through an MLflow server")
    return store


def _keep_store(store: Store, echo: Echo) -> Store:
    """The store the grid already uses; a served store gets its server (re)started when it is down."""
    from harness.tracking.store import check_store

    if store.server_dir is None:
        check_store(store.backend)
        return store
    from harness.tracking.server import ensure_server

    echo("MLflow server for the jobs: reusing or starting one (a start takes a while) ...")
    info = ensure_server(store.backend, Path(store.server_dir).parent / ARTIFACTS_DIR, store.server_dir)
    echo(f"MLflow server {info.url} ({'reused' if info.reused else 'started'}, process group {info.pgid}, "
         f"store {store.backend})")
    return store


def _backfill(cell_views: Sequence[CellView], store: Store, echo: Echo) -> None:
    """Send MLflow what settled cells logged while it was unreachable (live jobs send their own)."""
    from harness.tracking.store import bounded_http
    from harness.tracking.sync import sync_run

    behind = [v for v in cell_views if v.backlog and not v.job_alive and v.record and v.record.mlflow_run_id
              and v.record.store == store]
    if not behind:
        return
    uri = store.writer_uri() or store.backend
    with bounded_http():
        for v in behind:
            sync_run(v.folder, uri, v.record.mlflow_run_id)
    echo(f"sent MLflow what {len(behind)} finished cell(s) logged while it was unreachable")


def _grid_options(req: AblateRequest) -> str:
    """The command-line changes that made this grid (``--set``, ``--axis``, ``--rehearse``), as shell
    text: the report's ``--seeds`` command repeats them so that it names the same cells."""
    from harness.config import format_value

    parts = [f"--set {shlex.quote(f'{key}={format_value(value)}')}" for key, value in req.sets.items()]
    parts += [f"--axis {shlex.quote(name + '=' + ','.join(format_value(v) for v in values))}"
              for name, values in req.axes.items()]
    return " ".join(parts + (["--rehearse"] if req.rehearse else []))


def _start_tracking(record: GridRecord, grid: Grid, executor: str, options: str, margin: float) -> GridRecord:
    """Store schema + experiment once, before any job; one parent run per invocation."""
    from harness.tracking.runs import start_parent_run
    from harness.tracking.schema import GRID_FILE_TAG, GRID_MARGIN, GRID_OPTIONS, git_commit_of
    from harness.tracking.store import prepare_store

    uri = record.store.writer_uri()
    experiment_id = prepare_store(uri, grid.experiment)
    parent = start_parent_run(uri, experiment_id, grid=grid.name, axes=grid.axes_spec(),
                              paper_setting=grid.spec.paper_setting,
                              tags={"executor": executor, "git_commit": git_commit_of() or "unknown",
                                    GRID_FILE_TAG: str(grid.path), GRID_MARGIN: margin,
                                    GRID_OPTIONS: options})
    return record.model_copy(update={"experiment_id": experiment_id, "parent_run_id": parent})


def _launch_records(gdir: Path, cells: Sequence[Cell], grid_record: GridRecord, executor: str,
                    reuse: bool) -> list[LaunchRecord]:
    """Each cell's launch record with its MLflow run: the one it already has in this store (a
    resubmitted cell continues its own run, never a second one), else a new child run."""
    from harness.tracking import schema as S
    from harness.tracking.runs import create_cell_runs, set_state

    store, uri = grid_record.store, grid_record.store.writer_uri()
    olds = [read_record(gdir / c.folder / LAUNCH_FILE, LaunchRecord) if reuse else None for c in cells]

    def reused(old: LaunchRecord | None) -> str | None:
        if old is None or old.store is None or old.store.backend != store.backend or not old.mlflow_run_id:
            return None
        try:
            set_state(uri, old.mlflow_run_id, CellState.PENDING, tags={S.EXECUTOR: executor})
        except Exception:  # noqa: BLE001 - the run is gone from the store: make a new one
            return None
        return old.mlflow_run_id

    run_ids = _per_cell(reused, olds, uri)
    new = [i for i, run_id in enumerate(run_ids) if run_id is None]
    commit = S.git_commit_of() or "unknown"  # once, not a git call per cell

    def spec(cell: Cell) -> dict[str, Any]:
        tags = S.cell_tags(cell.config, grid=cell.grid, cell=cell.name, axis_values=cell.axis_values,
                           executor=executor, run_dir=gdir / cell.folder, git_commit=commit)
        return {"run_name": cell.run_name, "params": cell.config.flat(), "tags": tags}

    created = create_cell_runs(uri, grid_record.experiment_id, parent_run_id=grid_record.parent_run_id,
                               cells=[spec(cells[i]) for i in new])
    for i, run_id in zip(new, created):
        run_ids[i] = run_id
    records = []
    for cell, old, run_id in zip(cells, olds, run_ids):
        record = LaunchRecord(grid=cell.grid, name=cell.name, run_id=cell.run_id, cell_id=cell.cell_id,
                              seed=cell.seed, axes=cell.axis_values, store=store, mlflow_run_id=run_id,
                              submissions=old.submissions if old else [])
        write_record(gdir / cell.folder / LAUNCH_FILE, record)
        records.append(record)
    return records


def _per_cell(fn: Callable[[Any], Any], items: Sequence[Any], uri: str) -> list[Any]:
    """One MLflow call (or a few) per cell: concurrent over HTTP, where each call mostly waits
    on the server; one after another on SQLite, which takes one writer at a time."""
    from harness.tracking.store import is_http

    if not is_http(uri) or len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, items))


def _job(cells: Sequence[Cell], gdir: Path, launches: Sequence[LaunchRecord], threads: int) -> Any:
    from harness.launch.job import GroupJob

    return GroupJob(configs=[c.config.to_dict() for c in cells], run_dirs=[str(gdir / c.folder) for c in cells],
                    workdir=os.getcwd(), store=launches[0].store.model_dump() if launches[0].store else None,
                    mlflow_run_ids=[launch.mlflow_run_id for launch in launches], threads=threads)


def _record_submission(gdir: Path, cell: Cell, launch: LaunchRecord, job_id: str, executor: str,
                       log_dir: Path | None, group_size: int = 1) -> LaunchRecord:
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


def _record_group(gdir: Path, batch: _Batch, group: Sequence[int], job_id: str, executor: str,
                  log_dir: Path | None) -> None:
    """Every cell of a group job records the job (each cell's own launch record)."""
    for i in group:
        batch.launches[i] = _record_submission(gdir, batch.cells[i], batch.launches[i], job_id, executor, log_dir,
                                               group_size=len(group))


def _group_jobs(gdir: Path, batch: _Batch, threads: int) -> list[Any]:
    return [_job([batch.cells[i] for i in group], gdir, [batch.launches[i] for i in group], threads)
            for group in batch.groups]


def _submit_slurm(grid: Grid, gdir: Path, batch: _Batch, echo: Echo) -> None:
    from harness.launch.estimate import gpu_hours
    from harness.launch.executors import slurm_executor, submit_array
    from harness.tracking.runs import set_run_tags
    from harness.tracking.schema import SLURM_JOB_ID

    uri, threads = batch.record.store.writer_uri(), grid.resources.cpus_per_task
    max_timeouts, _ = job_time_limit(grid, batch.cells, batch.groups, gpu_hours(grid))
    executor = slurm_executor(gdir / SUBMITIT_DIR, grid.resources, job_name=f"milan-{grid.name}",
                              max_timeouts=max_timeouts)
    jobs = submit_array(executor, _group_jobs(gdir, batch, threads))
    for group, job in zip(batch.groups, jobs):
        _record_group(gdir, batch, group, job.job_id, "slurm", Path(job.paths.folder))
    # the job id ("<array>_<task>") in MLflow from now on, not only once the job starts and syncs
    job_of = {i: job.job_id for group, job in zip(batch.groups, jobs) for i in group}
    _per_cell(lambda i: set_run_tags(uri, batch.launches[i].mlflow_run_id, {SLURM_JOB_ID: job_of[i]}),
              list(range(len(batch.cells))), uri)
    echo(f"submitted {len(batch.cells)} cells as {_jobs_text(batch)} in Slurm job array "
         f"{jobs[0].job_id.partition('_')[0]} ({grid.resources.summary()} each)")


def _jobs_text(batch: _Batch) -> str:
    """``3 jobs (2 groups sharing data and teacher, of 8 and 4 cells; 1 alone)``."""
    shared = sorted((len(g) for g in batch.groups if len(g) > 1), reverse=True)
    alone = len(batch.groups) - len(shared)
    if not shared:
        return f"{len(batch.groups)} job(s), one per cell"
    parts = [f"{len(shared)} group(s) sharing data and teacher, of {', '.join(map(str, shared))} cells"]
    return f"{len(batch.groups)} job(s) ({'; '.join(parts + ([f'{alone} alone'] if alone else []))})"


def _run_local(grid: Grid, gdir: Path, batch: _Batch, progress: _Progress, echo: Echo) -> None:
    from harness.launch.executors import local_executor, local_slots, run_local

    concurrency, threads = local_slots(grid.resources)
    for group in batch.groups:  # status shows them pending until they start
        _record_group(gdir, batch, group, f"{QUEUED_PREFIX}{os.getpid()}", "local", None)
    echo(f"running {len(batch.cells)} cells here as {_jobs_text(batch)}, {concurrency} at a time with "
         f"{threads} torch thread(s) each")
    executor = local_executor(gdir / SUBMITIT_DIR, grid.resources)
    # the largest groups first: the last jobs to start are the short ones
    order = sorted(range(len(batch.groups)), key=lambda g: -len(batch.groups[g]))
    jobs = _group_jobs(gdir, batch, threads)

    def started(k: int, job: Any) -> None:
        _record_group(gdir, batch, batch.groups[order[k]], job.job_id, "local", Path(job.paths.folder))

    run_local(executor, [jobs[g] for g in order], concurrency, on_start=started, on_tick=progress.update,
              poll_s=POLL_S["local"])


def _run_debug(gdir: Path, batch: _Batch) -> None:
    from harness.launch.executors import run_debug

    def started(g: int, job: Any) -> None:
        _record_group(gdir, batch, batch.groups[g], f"debug-{os.getpid()}", "debug", None)

    run_debug(gdir / SUBMITIT_DIR, _group_jobs(gdir, batch, 0), on_start=started)


def _check_force_spares_other_cells(gdir: Path, grid: Grid, restarting: Sequence[CellView]) -> None:
    """--force cancels the live jobs of the cells it restarts: refuse when such a job is a group
    job that also trains a cell not chosen (cancelling it would stop that cell too)."""
    live = {v.job_id for v in restarting if v.job_alive and v.job_id}
    chosen = {v.folder for v in restarting}
    for cell in grid.cells:
        folder = gdir / cell.folder
        record = read_record(folder / LAUNCH_FILE, LaunchRecord) if live and folder not in chosen else None
        if record is not None and record.last is not None and record.last.job_id in live:
            raise UserError(f"--force would cancel job {record.last.job_id}, which also trains '{cell.run_name}' "
                            "(not chosen): wait for the job to end, or choose every cell of its group "
                            "(`bench.py status` shows them with the job)")


def _clear(cell_views: Sequence[CellView], echo: Echo) -> None:
    """--force: cancel the cells' active jobs, then remove their folders (fresh runs)."""
    from harness.launch import slurm

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


def _how_to_follow(grid: Grid, gdir: Path, runs_dir: Path, echo: Echo) -> None:
    runs = f" --runs-dir {runs_dir}" if runs_dir != AblateRequest.runs_dir else ""
    echo(f"follow with: python bench.py status {grid.name}{runs}   (or squeue -n milan-{grid.name}); "
         "to wait for the end and the report, repeat this ablate command with --wait")
    echo(f"run folders: {gdir}/<cell>/ (launch.json, status.json, logs/)")


# --- waiting ---------------------------------------------------------------------------------------

class _Progress:
    """Prints a line whenever a cell changes state, and the counts when they change."""

    def __init__(self, gdir: Path, cells: Sequence[Cell], echo: Echo) -> None:
        self.dirs = [gdir / c.folder for c in cells]
        self.echo = echo
        self.seen: dict[Path, str] = {}
        self.last_counts = ""
        self.views: list[CellView] = []

    def update(self) -> list[CellView]:
        self.views = collect(self.dirs)
        for view in self.views:
            if self.seen.get(view.folder) != view.state:
                self.seen[view.folder] = view.state
                self.echo(display.transition(view))
        now = display.counts(self.views)
        if now != self.last_counts:
            self.last_counts = now
            self.echo(f"         [{now}]")
        return self.views


def wait_for_cells(progress: _Progress, poll_s: float) -> list[CellView]:
    """Poll folders and the scheduler until every cell is over and its job gone."""
    while not all(v.settled for v in progress.update()):
        time.sleep(poll_s)
    return progress.views


def _finish(gdir: Path, record: GridRecord, final: Sequence[CellView], echo: Echo) -> None:
    """Show the failures; end the invocation's MLflow parent run (when its jobs have not)."""
    if details := display.failure_details([v for v in final if v.state == CellState.FAILED]):
        echo(details)
    if record.store is not None:
        _backfill(collect([v.folder for v in final]), record.store, echo)
        close_parent_if_settled(gdir)
