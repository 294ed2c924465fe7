"""``bench.py ablate``: a grid becomes jobs, in four steps, each a module of its own:

1. plan (:mod:`.plan`): the grid file -> frozen cells; what to do with each (a done cell is skipped,
   a cell with a live job left alone, any other (re)submitted to continue from its checkpoint;
   ``--force`` restarts); the jobs (cells that differ only on the student side train together);
   the preflight. ``--dry-run`` stops here and shows the plan.
2. register (:mod:`.register`): the tracking store, the parent run of this invocation, each cell's
   run, and the launch records.
3. submit (:mod:`.submit`): one group job per group of cells, through Slurm, local processes or
   this process.
4. follow (:mod:`.follow`): Slurm submissions return at once unless asked to wait; local runs always
   wait. Then the failures are shown and the parent run is ended.

Invocations of one grid are serialised by the grid's lock, so two at the same moment submit each
cell once. The CLI writes the report afterwards (the report is a later stage than launching).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.grid import Grid
from harness.launch import follow, plan, register, submit
from harness.launch.cell_views import CellView
from harness.launch.records import GridRecord, grid_dir, grid_lock
from harness.run.cell_state import CellState

Echo = Callable[[str], None]


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
    views: list[CellView] = field(default_factory=list)  # final states when waited for
    record: GridRecord | None = None  # what this invocation recorded (its store and experiment)

    @property
    def waited(self) -> bool:
        return bool(self.views)

    @property
    def ok(self) -> bool:
        return all(v.state != CellState.FAILED for v in self.views)


def ablate(req: AblateRequest, echo: Echo = print) -> AblateOutcome:
    start = time.perf_counter()
    grid, executor = plan.load(req.grid, sets=dict(req.sets), axes=dict(req.axes), seeds=req.seeds,
                               executor=req.executor, rehearse=req.rehearse, runs_dir=req.runs_dir, echo=echo)
    chosen = plan.choose(grid, req.cells)
    outcome = AblateOutcome(grid, executor)
    if req.dry_run:
        plan.dry_run(grid, executor, req.runs_dir, chosen, force=req.force, share=req.share, echo=echo)
        return outcome
    wait = req.wait or req.rehearse or executor != "slurm"
    gdir = grid_dir(req.runs_dir, grid.name).absolute()
    with grid_lock(gdir):  # another ablate of this grid waits here, then finds these cells active
        planned = plan.plan(grid, executor, req.runs_dir, chosen, force=req.force, share=req.share, echo=echo)
        store = register.open_store(planned, tracking_uri=req.tracking_uri, runs_dir=req.runs_dir, echo=echo)
        if req.force and planned.todo:
            submit.clear_for_restart([planned.views[chosen.index(i)] for i in planned.todo], echo)
        registration = register.register(planned, store, margin=req.margin, reuse_runs=not req.force,
                                         options=register.grid_options(dict(req.sets), dict(req.axes), req.rehearse))
        submitter = submit.Submitter(planned, registration, echo)
        if planned.todo and executor == "slurm":
            submitter.slurm()
    outcome.record = registration.record
    if not wait:
        follow.how_to_follow(grid, gdir, req.runs_dir, AblateRequest.runs_dir, echo)
        echo(f"ablate took {_elapsed(start, planned.setup_seconds)}")
        return outcome
    changes = follow.StateChanges(gdir, [grid.cells[i] for i in chosen], echo)
    if planned.todo and executor == "local":
        submitter.local(on_tick=changes.update, poll_s=follow.POLL_S["local"])
    elif planned.todo and executor == "debug":
        submitter.debug()
    outcome.views = follow.wait_for_cells(changes, follow.POLL_S.get(executor, 2.0))
    follow.finish(gdir, registration.record, outcome.views, echo)
    echo(f"grid {grid.name} took {_elapsed(start, planned.setup_seconds)}")
    return outcome


def _elapsed(start: float, setup_seconds: float) -> str:
    """Seconds since ``start``, the demo set-up (data, teacher) counted apart."""
    total = time.perf_counter() - start
    if setup_seconds < 0.5:
        return f"{total:.1f} s"
    return f"{total - setup_seconds:.1f} s, plus {setup_seconds:.0f} s making the demo data and teacher"
