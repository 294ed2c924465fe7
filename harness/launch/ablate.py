"""``bench.py ablate``: a grid -> preflight -> tracking runs -> jobs -> (optionally) wait -> report.

Idempotent: a cell whose folder says done is skipped, a queued or running one is left alone,
a failed or missing one is (re)submitted and continues from its checkpoint in its own folder
and its own MLflow run; ``force`` cancels and restarts everything in fresh folders.
Slurm submissions return at once unless asked to wait; local runs always wait.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.grid import Cell, Grid, find_grid_file, load_grid
from harness.launch import views
from harness.launch.records import (
    GRID_FILE,
    LAUNCH_FILE,
    SUBMITIT_DIR,
    GridRecord,
    LaunchRecord,
    grid_dir,
    grid_lock,
    link_logs,
    new_submission,
    read_record,
    write_record,
)
from harness.launch.state import QUEUED_PREFIX, CellView, collect, plan

Echo = Callable[[str], None]
DEFAULT_GRID = "smoke"
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
    reports_dir: Path = Path("reports")


@dataclass
class AblateOutcome:
    grid: Grid
    executor: str
    submitted: list[Cell] = field(default_factory=list)
    views: list[CellView] = field(default_factory=list)  # final states when waited for
    report: Path | None = None

    @property
    def ok(self) -> bool:
        return all(v.state.state != "failed" for v in self.views)


def ablate(req: AblateRequest, echo: Echo = print) -> AblateOutcome:
    from harness.launch.executors import resolve_executor

    start = time.perf_counter()
    grid = load_grid(find_grid_file(req.grid or DEFAULT_GRID), sets=req.sets, axes=req.axes, seeds=req.seeds)
    executor = "local" if req.grid is None and req.executor == "auto" else resolve_executor(req.executor)
    gdir = grid_dir(req.runs_dir, grid.name).absolute()
    outcome = AblateOutcome(grid, executor)
    if req.dry_run:
        _dry_run(grid, gdir, executor, req, echo)
        return outcome
    with grid_lock(gdir):  # another ablate of this grid waits here, then finds these cells active
        batch = _prepare(grid, gdir, executor, req, echo)
        if batch.cells and executor == "slurm":
            _submit_slurm(grid, gdir, batch, echo)
    outcome.submitted = batch.cells
    if executor == "slurm" and not req.wait:
        _how_to_follow(grid, gdir, req.runs_dir, echo)
        echo(f"ablate took {_elapsed(start, batch)}")
        return outcome
    progress = _Progress(gdir, grid.cells, echo)
    if batch.cells and executor == "local":
        _run_local(grid, gdir, batch, progress, echo)
    elif batch.cells and executor == "debug":
        _run_debug(gdir, batch)
    outcome.views = wait_for_cells(progress, POLL_S.get(executor, 2.0))
    _finish(gdir, batch.record, outcome.views, echo)
    if write_report(grid, batch.record, req.reports_dir / grid.name, req.runs_dir, echo):
        outcome.report = req.reports_dir / grid.name / "report.md"
    echo(f"grid {grid.name} took {_elapsed(start, batch)}")
    return outcome


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
    setup_seconds: float = 0.0  # making the demo data / teacher on first use


def _prepare(grid: Grid, gdir: Path, executor: str, req: AblateRequest, echo: Echo) -> _Batch:
    """Plan, preflight, tracking runs and launch records: everything before submission."""
    from harness.launch.preflight import ensure_demo_assets, preflight_grid

    now = collect([gdir / c.folder for c in grid.cells])
    todo = [i for i, v in enumerate(now) if plan(v.state, req.force) in ("submit", "restart")]
    echo(f"grid {grid.name}: {len(grid.cells)} cells ({views.counts([v.state for v in now])}); "
         f"{len(todo)} to {'restart' if req.force else 'submit'} with the {executor} executor")
    setup_seconds = 0.0
    if todo:
        setup_seconds = ensure_demo_assets((grid.cells[i].config for i in todo), echo)
        preflight_grid(grid, executor, cache_dir=req.runs_dir)
    previous = read_record(gdir / GRID_FILE, GridRecord)
    # nothing to submit: keep the store of the last submission (no server start for nothing)
    uri = _tracking_uri(req, grid, executor, echo) if todo or previous is None else previous.tracking_uri
    record = GridRecord(grid=grid.name, experiment=grid.experiment, grid_file=str(grid.path) if grid.path else None,
                        executor=executor, tracking_uri=uri, submitted_at=time.time(),
                        folders=[c.folder for c in grid.cells], axes=grid.axes_spec(),
                        paper_setting=grid.spec.paper_setting)
    if previous and previous.tracking_uri == uri:
        record = record.model_copy(update={"experiment_id": previous.experiment_id,
                                           "parent_run_id": previous.parent_run_id,
                                           "parent_finished": previous.parent_finished})
    cells, launches = [grid.cells[i] for i in todo], []
    if todo:
        if req.force:
            _clear([now[i] for i in todo], echo)
        record = _start_tracking(record, grid, uri, executor)
        launches = _launch_records(gdir, cells, uri, record, executor, reuse=not req.force)
    write_record(gdir / GRID_FILE, record)
    return _Batch(record, cells, launches, setup_seconds)


# --- steps ---------------------------------------------------------------------------------------

def _dry_run(grid: Grid, gdir: Path, executor: str, req: AblateRequest, echo: Echo) -> None:
    from harness.launch.estimate import gpu_hours
    from harness.launch.preflight import DEMO_DATA, DEMO_TEACHER, preflight_grid

    views_now = collect([gdir / c.folder for c in grid.cells])
    actions = [plan(v.state, req.force) for v in views_now]
    echo(f"grid {grid.name} ({grid.path}): {grid.spec.description.strip()}" if grid.spec.description
         else f"grid {grid.name} ({grid.path})")
    echo(f"executor {executor}; runs in {gdir}; nothing is submitted (dry run)")
    echo(views.plan_table(grid, views_now, gpu_hours(grid), actions))
    missing = [p for p in (DEMO_DATA, DEMO_TEACHER) if not p.exists()
               and any(str(p) in (c.config.data.root, c.config.teacher.pretrained) for c in grid.cells)]
    if missing:
        echo(f"preflight: skipped; {', '.join(map(str, missing))} would be made first")
        return
    preflight_grid(grid, executor)
    echo("preflight: ok")


def _tracking_uri(req: AblateRequest, grid: Grid, executor: str, echo: Echo) -> str:
    """--tracking-uri, else the grid's, else SQLite in the cwd (local) or an MLflow server on
    this host over a SQLite store under the runs folder (Slurm jobs log over HTTP)."""
    import harness.tracking as tracking

    uri = req.tracking_uri or grid.spec.tracking.uri
    if uri is None and executor == "slurm":
        runs = req.runs_dir.absolute()
        store = tracking.sqlite_uri(runs / "mlflow.db")
        echo("MLflow server for the jobs: starting or reusing one (the first start takes a while) ...")
        info = tracking.ensure_server(store, runs / "mlflow-artifacts", runs / ".mlflow-server")
        echo(f"MLflow server {info.url} ({'reused' if info.reused else 'started'}, pid {info.pid}, store {store})")
        uri = info.url
    uri = uri or tracking.default_tracking_uri()
    tracking.check_store(uri)
    if executor == "slurm" and tracking.sqlite_path(uri) is not None:
        echo("warning: the jobs will all write to this SQLite file; on a cluster's shared filesystem that "
             "locks or corrupts: leave --tracking-uri unset to log through an MLflow server")
    return uri


def _start_tracking(record: GridRecord, grid: Grid, uri: str, executor: str) -> GridRecord:
    """Store schema + experiment once, before any job; one parent run per invocation."""
    import harness.tracking as tracking
    from harness.tracking.schema import git_commit_of

    experiment_id = tracking.prepare_store(uri, grid.experiment)
    parent = tracking.start_parent_run(uri, experiment_id, grid=grid.name, axes=grid.axes_spec(),
                                       paper_setting=grid.spec.paper_setting,
                                       tags={"executor": executor, "git_commit": git_commit_of() or "unknown",
                                             "grid_file": str(grid.path)})
    return record.model_copy(update={"experiment_id": experiment_id, "parent_run_id": parent})


def _launch_records(gdir: Path, cells: Sequence[Cell], uri: str, grid_record: GridRecord, executor: str,
                    reuse: bool) -> list[LaunchRecord]:
    """Each cell's launch record with its MLflow run: the one it already has in this store (a
    resubmitted cell continues its own run), else a new child run of this invocation."""
    import harness.tracking as tracking
    from harness.tracking.schema import git_commit_of

    olds = [read_record(gdir / c.folder / LAUNCH_FILE, LaunchRecord) if reuse else None for c in cells]

    def reused(old: LaunchRecord | None) -> str | None:
        if old is None or old.tracking_uri != uri or not old.mlflow_run_id:
            return None
        try:
            tracking.mark_run(uri, old.mlflow_run_id, "pending")
            tracking.set_run_tags(uri, old.mlflow_run_id, {"executor": executor})
        except Exception:  # noqa: BLE001 - the run is gone from the store: make a new one
            return None
        return old.mlflow_run_id

    run_ids = _per_cell(reused, olds, uri)
    new = [i for i, run_id in enumerate(run_ids) if run_id is None]
    commit = git_commit_of() or "unknown"  # once, not a git call per cell

    def spec(cell: Cell) -> dict[str, Any]:
        tags = tracking.cell_tags(cell.config, grid=cell.grid, axis_values=cell.axis_values, executor=executor,
                                  run_dir=gdir / cell.folder, git_commit=commit)
        return {"run_name": tracking.run_name(cell.axis_values, cell.seed), "params": cell.config.flat(), "tags": tags}

    created = tracking.create_cell_runs(uri, grid_record.experiment_id, parent_run_id=grid_record.parent_run_id,
                                        cells=[spec(cells[i]) for i in new])
    for i, run_id in zip(new, created):
        run_ids[i] = run_id
    records = []
    for cell, old, run_id in zip(cells, olds, run_ids):
        record = LaunchRecord(grid=cell.grid, name=cell.name, run_id=cell.run_id, cell_id=cell.cell_id,
                              seed=cell.seed, axes=cell.axis_values, tracking_uri=uri, mlflow_run_id=run_id,
                              submissions=old.submissions if old else [])
        write_record(gdir / cell.folder / LAUNCH_FILE, record)
        records.append(record)
    return records


def _per_cell(fn: Callable[[Any], Any], items: Sequence[Any], uri: str) -> list[Any]:
    """One MLflow call (or a few) per cell: concurrent over HTTP, where each call mostly waits
    on the server; one after another on SQLite, which takes one writer at a time."""
    from harness.tracking import is_http

    if not is_http(uri) or len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, items))


def _job(cell: Cell, gdir: Path, launch: LaunchRecord, threads: int) -> Any:
    from harness.launch.job import CellJob

    return CellJob(config=cell.config.to_dict(), run_dir=str(gdir / cell.folder), workdir=os.getcwd(),
                   tracking_uri=launch.tracking_uri, mlflow_run_id=launch.mlflow_run_id, threads=threads)


def _record_submission(gdir: Path, cell: Cell, launch: LaunchRecord, job_id: str, executor: str,
                       log_dir: Path | None) -> LaunchRecord:
    cell_dir = gdir / cell.folder
    earlier = launch.submissions
    if earlier and earlier[-1].job_id.startswith(QUEUED_PREFIX):  # a queued local cell starts
        earlier = earlier[:-1]
    launch = launch.model_copy(update={"submissions": [*earlier, new_submission(job_id, executor, log_dir)]})
    write_record(cell_dir / LAUNCH_FILE, launch)
    if log_dir is not None:
        link_logs(cell_dir, log_dir)
    return launch


def _submit_slurm(grid: Grid, gdir: Path, batch: _Batch, echo: Echo) -> None:
    import harness.tracking as tracking
    from harness.launch.executors import slurm_executor, submit_array

    uri, threads = batch.record.tracking_uri, grid.resources.cpus_per_task
    executor = slurm_executor(gdir / SUBMITIT_DIR, grid.resources, job_name=f"milan-{grid.name}")
    jobs = submit_array(executor, [_job(c, gdir, l, threads) for c, l in zip(batch.cells, batch.launches)])
    for cell, launch, job in zip(batch.cells, batch.launches, jobs):
        _record_submission(gdir, cell, launch, job.job_id, "slurm", Path(job.paths.folder))

    def tag(pair: tuple[LaunchRecord, Any]) -> None:
        launch, job = pair
        array_id, _, task = job.job_id.partition("_")
        tracking.set_run_tags(uri, launch.mlflow_run_id, {"slurm.job_id": job.job_id,
                                                          "slurm.array_job_id": array_id,
                                                          "slurm.array_task_id": task})
    _per_cell(tag, list(zip(batch.launches, jobs)), uri)
    echo(f"submitted {len(jobs)} cells as Slurm job array {jobs[0].job_id.partition('_')[0]} "
         f"({grid.resources.summary()} each)")


def _run_local(grid: Grid, gdir: Path, batch: _Batch, progress: _Progress, echo: Echo) -> None:
    from harness.launch.executors import local_executor, local_slots, run_local

    concurrency, threads = local_slots(grid.resources)
    cells = batch.cells
    launches = [_record_submission(gdir, c, l, f"{QUEUED_PREFIX}{os.getpid()}", "local", None)
                for c, l in zip(cells, batch.launches)]  # status shows them pending until they start
    echo(f"running {len(cells)} cells here, {concurrency} at a time with {threads} torch thread(s) each")
    executor = local_executor(gdir / SUBMITIT_DIR, grid.resources)

    def started(i: int, job: Any) -> None:
        launches[i] = _record_submission(gdir, cells[i], launches[i], job.job_id, "local", Path(job.paths.folder))

    run_local(executor, [_job(c, gdir, l, threads) for c, l in zip(cells, launches)], concurrency,
              on_start=started, on_tick=progress.update, poll_s=POLL_S["local"])


def _run_debug(gdir: Path, batch: _Batch) -> None:
    from harness.launch.executors import run_debug

    launches = list(batch.launches)

    def started(i: int, job: Any) -> None:
        launches[i] = _record_submission(gdir, batch.cells[i], launches[i], f"debug-{os.getpid()}", "debug", None)

    run_debug(gdir / SUBMITIT_DIR, [_job(c, gdir, l, 0) for c, l in zip(batch.cells, launches)], on_start=started)


def _clear(cell_views: Sequence[CellView], echo: Echo) -> None:
    """--force: cancel the cells' active jobs, then remove their folders (fresh runs)."""
    from harness.launch import slurm

    active = [v for v in cell_views if v.state.active]
    local = [v for v in active if v.record and v.record.last and v.record.last.executor != "slurm"]
    if local:
        raise UserError(f"{len(local)} cell(s) run locally under another ablate (e.g. {local[0].folder}): "
                        "stop it before --force")
    ids = [v.state.job_id for v in active if v.state.job_id]
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
            if self.seen.get(view.folder) != view.state.state:
                self.seen[view.folder] = view.state.state
                self.echo(views.transition(view))
        now = views.counts([v.state for v in self.views])
        if now != self.last_counts:
            self.last_counts = now
            self.echo(f"         [{now}]")
        return self.views


def wait_for_cells(progress: _Progress, poll_s: float) -> list[CellView]:
    """Poll folders and the scheduler until every cell is over and its job gone."""
    while not all(v.state.settled for v in progress.update()):
        time.sleep(poll_s)
    return progress.views


def _finish(gdir: Path, record: GridRecord, final: Sequence[CellView], echo: Echo) -> None:
    """Show the failures and end the invocation's MLflow parent run."""
    failed = [v for v in final if v.state.state == "failed"]
    if failed:
        echo(views.failure_details(failed))
    if record.parent_run_id and record.tracking_uri and not record.parent_finished:
        import harness.tracking as tracking

        tracking.finish_run(record.tracking_uri, record.parent_run_id, "failed" if failed else "done")
        write_record(gdir / GRID_FILE, record.model_copy(update={"parent_finished": True}))


def headline_metric(grid: Grid) -> str:
    """The report's headline metric: the first evaluation protocol the cells run."""
    protocols = {p for cell in grid.cells for p in cell.config.eval.protocols}
    return next((f"{p}_top1" for p in ("linear", "finetune", "knn") if p in protocols), "final_loss")


def write_report(grid: Grid, record: GridRecord, out_dir: Path, runs_dir: Path, echo: Echo) -> bool:
    """The grid's report from its MLflow runs, through ``bench.py report`` (which also logs it
    to the invocation's parent run). A report that cannot be built does not fail the ablate."""
    if not record.tracking_uri:
        return False
    from harness.tracking.commands import report_command

    try:
        report_command(grid=record.experiment, tracking_uri=record.tracking_uri, metric=headline_metric(grid),
                       format_="md,csv,tex,html", out=out_dir, log_to_mlflow=True, runs_dir=runs_dir)
    except UserError as err:
        echo(f"report: not written ({err})")
        return False
    return True
