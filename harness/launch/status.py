"""``bench.py status``: every cell's state from its folder and Slurm (squeue/scontrol, no sacct).
It only reads: nothing is written, to the run folders, MLflow or anywhere else."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.core.errors import UserError
from harness.grid import find_grid_file, load_grid
from harness.launch import display
from harness.launch.records import GRID_FILE, GridRecord, grid_dir, read_record
from harness.launch.cell_views import CellView, collect
from harness.launch.chain import status_lines

Echo = Callable[[str], None]


def grid_views(grid: str, runs_dir: Path) -> tuple[str, list[CellView]]:
    """(grid name, cell views) for a grid name or file; a grid never submitted shows its cells as missing."""
    if (record := read_record(grid_dir(runs_dir, grid) / GRID_FILE, GridRecord)) is None:
        loaded = load_grid(find_grid_file(grid))
        if (record := read_record(grid_dir(runs_dir, loaded.name) / GRID_FILE, GridRecord)) is None:
            return loaded.name, collect([grid_dir(runs_dir, loaded.name) / c.folder for c in loaded.cells])
    return record.grid, collect([grid_dir(runs_dir, record.grid) / f for f in record.folders])


def show_status(grid: str | None, runs_dir: Path, echo: Echo = print, log_lines: int = 8) -> list[CellView]:
    if grid is None:
        return _show_all(runs_dir, echo)
    name, cell_views = grid_views(grid, runs_dir)
    echo(display.status_table(cell_views))
    echo(f"grid {name}: {display.counts(cell_views)}")
    for line in status_lines(grid_dir(runs_dir, name)):  # ablate --until-resolved: its rounds
        echo(line)
    if details := display.failure_details(cell_views, log_lines):
        echo(details)
    return cell_views


def _show_all(runs_dir: Path, echo: Echo) -> list[CellView]:
    if not (records := sorted(runs_dir.glob(f"*/{GRID_FILE}"))):
        raise UserError(f"no grid has been submitted under {runs_dir}: run `bench.py ablate` first")
    everything: list[CellView] = []
    for path in records:
        if (record := read_record(path, GridRecord)) is not None:
            cell_views = collect([path.parent / f for f in record.folders])
            echo(f"{record.grid:<30} {display.counts(cell_views)}")
            everything += cell_views
    echo("details: bench.py status <grid>")
    return everything
