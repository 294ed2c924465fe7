"""``ablate``'s first step: plan the cells. The grid file becomes frozen cells, the invocation's
cells are chosen, each is given what ``ablate`` will do with it (submit, restart, skip, leave), the
cells to submit are grouped into jobs (:mod:`harness.config.student_side`), and everything that can
be checked before a submission is checked (:mod:`.preflight`). Also the dry run's account of a plan.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.config.student_side import group_by_share_key
from harness.core.errors import UserError
from harness.data.assets import DEMO_DATA, DEMO_TEACHER, ensure_demo_assets
from harness.grid import Cell, Grid, find_grid_file, load_grid
from harness.launch import display, slurm
from harness.launch.cell_views import CellView, collect, plan_action
from harness.launch.estimate import gpu_hours, job_hours, sharing_saving
from harness.launch.executors import resolve_executor, timeout_allowance
from harness.launch.preflight import check_settings, check_weight_sources, preflight_grid
from harness.launch.records import LAUNCH_FILE, LaunchRecord, grid_dir, read_record
from harness.run.folder import check_owner

Echo = Callable[[str], None]
DEFAULT_GRID = "smoke"


@dataclass(frozen=True)
class Plan:
    """What one ``ablate`` invocation will do: its grid, executor and cells, and the jobs to submit."""

    grid: Grid
    executor: str
    gdir: Path  # the grid's run folder (absolute)
    chosen: list[int]  # the cells this invocation covers (indices into grid.cells)
    views: list[CellView]  # their states when planned, in the order of ``chosen``
    todo: list[int]  # the cells to (re)submit, indices into grid.cells
    groups: list[list[int]]  # the jobs: indices into ``todo``, one list per job
    setup_seconds: float = 0.0  # making the demo data / teacher on first use

    @property
    def cells(self) -> list[Cell]:
        """The cells to (re)submit."""
        return [self.grid.cells[i] for i in self.todo]


def load(grid: str | None, *, sets: dict[str, Any], axes: dict[str, Sequence[Any]], seeds: int | None,
         executor: str, rehearse: bool, runs_dir: Path, echo: Echo) -> tuple[Grid, str]:
    """The grid (shipped name or file, with the command line's changes; at micro scale with
    ``rehearse``) and the executor that runs it (``auto`` without a grid: local)."""
    loaded = load_grid(find_grid_file(grid or DEFAULT_GRID), sets=sets, axes=axes, seeds=seeds)
    chosen_executor = "local" if grid is None and executor == "auto" else resolve_executor(executor)
    if rehearse:
        loaded = _rehearsal(loaded, chosen_executor, runs_dir, echo)
    return loaded, chosen_executor


def _rehearsal(grid: Grid, executor: str, runs_dir: Path, echo: Echo) -> Grid:
    """The grid at micro scale (harness.grid.rehearsal), after the checks of the real grid that a
    rehearsal cannot make (each protocol's settings against the cell's tasks)."""
    # the rehearsal samples images and the local GPU count needs torch: seconds of imports that a
    # plain submission does not pay
    from harness.grid.rehearsal import rehearse

    check_settings(grid)
    if executor == "slurm":
        cpus, gpus = slurm.node_shape(grid.resources.partition)
    else:
        import torch

        cpus, gpus = len(os.sched_getaffinity(0)), torch.cuda.device_count()
    rehearsal = rehearse(grid, runs_dir=runs_dir, cpu_only=gpus == 0, cpus_per_node=cpus or None)
    for note in rehearsal.notes:
        echo(f"rehearsal: {note}")
    return rehearsal.grid


def choose(grid: Grid, selectors: Sequence[str]) -> list[int]:
    """Indices of the cells ``--cell`` selects (all without it); an unmatched selector is an error."""
    if not selectors:
        return list(range(len(grid.cells)))
    chosen = [i for i, c in enumerate(grid.cells) if any(s in c.folder or s in c.run_name for s in selectors)]
    unmatched = [s for s in selectors if not any(s in c.folder or s in c.run_name for c in grid.cells)]
    if unmatched:
        raise UserError(f"--cell {unmatched[0]!r} matches no cell of grid {grid.name}: give part of a cell's "
                        f"folder or name, e.g. {grid.cells[0].folder!r} (see `bench.py ablate {grid.name} --dry-run`)")
    return chosen


def plan(grid: Grid, executor: str, runs_dir: Path, chosen: Sequence[int], *, force: bool, share: bool,
         echo: Echo) -> Plan:
    """The cells to (re)submit and their jobs, checked: the demo assets made where the cells need
    them, then the preflight. Raises a one-line UserError before anything is written."""
    gdir = grid_dir(runs_dir, grid.name).absolute()
    views = collect([gdir / grid.cells[i].folder for i in chosen])
    todo = [i for i, v in zip(chosen, views) if plan_action(v, force) in ("submit", "restart")]
    echo(f"grid {grid.name}: {len(chosen)} cells ({display.counts(views)}); "
         f"{len(todo)} to {'restart' if force else 'submit'} with the {executor} executor")
    if force:
        check_force_spares_other_cells(gdir, grid, [views[chosen.index(i)] for i in todo])
    for i in todo:  # a folder of another config's run is neither resumed nor overwritten
        if not force:
            check_owner(gdir / grid.cells[i].folder, grid.cells[i].run_id)
    setup_seconds = 0.0
    if todo:
        configs = [grid.cells[i].config for i in todo]
        check_weight_sources([grid.cells[i] for i in todo], runs_dir)
        setup_seconds = ensure_demo_assets([c.data.root for c in configs], [c.teacher.pretrained for c in configs], echo)
        preflight_grid(grid, executor, cache_dir=runs_dir)
    groups = job_groups([grid.cells[i] for i in todo], share, grid.resources.max_cells_per_job)
    return Plan(grid, executor, gdir, list(chosen), views, todo, groups, setup_seconds)


def job_groups(cells: Sequence[Cell], share: bool, max_cells: int | None = None) -> list[list[int]]:
    """Indices of ``cells`` per job: the cells that differ only on the student side together
    (harness.config.student_side), at most ``max_cells`` per job (a larger group is split evenly), or
    one job per cell without sharing."""
    indices = list(range(len(cells)))
    if not share:
        return [[i] for i in indices]
    jobs = []
    for group in group_by_share_key(indices, [c.config for c in cells]):
        parts = -(-len(group) // max_cells) if max_cells else 1
        jobs += [group[k::parts] for k in range(parts)]
    return jobs


def check_force_spares_other_cells(gdir: Path, grid: Grid, restarting: Sequence[CellView]) -> None:
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


# --- the dry run ---------------------------------------------------------------------------------

def dry_run(grid: Grid, executor: str, runs_dir: Path, chosen: Sequence[int], *, force: bool, share: bool,
            echo: Echo) -> None:
    """What ``ablate`` would do, cell by cell, with its cost estimate and the preflight; submits nothing."""
    gdir = grid_dir(runs_dir, grid.name).absolute()
    views_now = collect([gdir / c.folder for c in grid.cells])
    actions = [plan_action(v, force) if i in chosen else "leave (not chosen)" for i, v in enumerate(views_now)]
    echo(f"grid {grid.name} ({grid.path}): {grid.spec.description.strip()}" if grid.spec.description
         else f"grid {grid.name} ({grid.path})")
    echo(f"executor {executor}; runs in {gdir}; nothing is submitted (dry run)")
    todo = [i for i, action in enumerate(actions) if action in ("submit", "restart")]
    groups = [[todo[k] for k in group] for group in job_groups([grid.cells[i] for i in todo], share,
                                                                grid.resources.max_cells_per_job)]
    job_of = {i: n for n, group in enumerate(groups, 1) for i in group}
    hours = gpu_hours(grid)
    echo(display.plan_table(grid, views_now, hours, actions, job_of))
    if todo:
        echo(_groups_line(grid, groups, share, [hours.get(grid.cells[i].run_id) for i in todo]))
        if executor == "slurm" and (line := job_time_limit(grid, grid.cells, groups, hours)[1]):
            echo(line)
    missing = [p for p in (DEMO_DATA, DEMO_TEACHER) if not p.exists()
               and any(str(p) in (c.config.data.root, c.config.teacher.pretrained) for c in grid.cells)]
    if missing:
        echo(f"preflight: skipped; {', '.join(map(str, missing))} would be made first")
        return
    check_weight_sources([grid.cells[i] for i in todo], runs_dir)
    preflight_grid(grid, executor)
    echo("preflight: ok")


def _groups_line(grid: Grid, groups: Sequence[Sequence[int]], share: bool, hours: Sequence[Any]) -> str:
    """The dry run's account of the jobs: how the cells group, and what the grouping saves
    (``hours``: the estimated GPU-hours of the cells to submit)."""
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
