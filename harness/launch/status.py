"""``bench.py status``: every cell's state from its folder and Slurm (squeue/scontrol, no sacct)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from harness.errors import UserError
from harness.launch import views
from harness.launch.records import GRID_FILE, GridRecord, grid_dir, read_record, write_record
from harness.launch.state import CellView, collect

Echo = Callable[[str], None]


def grid_views(grid: str, runs_dir: Path) -> tuple[str, GridRecord | None, list[CellView]]:
    """(grid name, its latest ablate record, cell views) for a grid name or grid file.

    A grid that was never submitted shows its expanded cells as missing.
    """
    record = read_record(grid_dir(runs_dir, grid) / GRID_FILE, GridRecord)
    if record is None:
        from harness.grid import find_grid_file, load_grid

        loaded = load_grid(find_grid_file(grid))
        gdir = grid_dir(runs_dir, loaded.name)
        record = read_record(gdir / GRID_FILE, GridRecord)
        folders = record.folders if record else [c.folder for c in loaded.cells]
        return loaded.name, record, collect([gdir / f for f in folders])
    return record.grid, record, collect([grid_dir(runs_dir, grid) / f for f in record.folders])


def show_status(grid: str | None, runs_dir: Path, echo: Echo = print, log_lines: int = 8) -> list[CellView]:
    if grid is None:
        return _show_all(runs_dir, echo)
    name, record, cell_views = grid_views(grid, runs_dir)
    echo(views.status_table(cell_views))
    echo(f"grid {name}: {views.counts([v.state for v in cell_views])}")
    details = views.failure_details(cell_views, log_lines)
    if details:
        echo(details)
    if record is not None and all(v.state.settled for v in cell_views):
        _close_parent_run(grid_dir(runs_dir, name), record, cell_views)
    return cell_views


def _show_all(runs_dir: Path, echo: Echo) -> list[CellView]:
    records = sorted(runs_dir.glob(f"*/{GRID_FILE}"))
    if not records:
        raise UserError(f"no grid has been submitted under {runs_dir}: run `bench.py ablate` first")
    everything: list[CellView] = []
    for path in records:
        record = read_record(path, GridRecord)
        if record is None:
            continue
        cell_views = collect([path.parent / f for f in record.folders])
        echo(f"{record.grid:<30} {views.counts([v.state for v in cell_views])}")
        everything += cell_views
    echo("details: bench.py status <grid>")
    return everything


def _close_parent_run(gdir: Path, record: GridRecord, cell_views: list[CellView]) -> None:
    """A non-blocking ablate leaves its MLflow parent run open; close it once every cell ended."""
    if record.parent_finished or not (record.parent_run_id and record.tracking_uri):
        return
    import harness.tracking as tracking

    failed = any(v.state.state == "failed" for v in cell_views)
    try:
        with tracking.bounded_http(retries=0, timeout_s=5):  # status must answer quickly
            tracking.finish_run(record.tracking_uri, record.parent_run_id, "failed" if failed else "done")
    except Exception:  # noqa: BLE001 - the store may be down; status must still answer
        return
    write_record(gdir / GRID_FILE, record.model_copy(update={"parent_finished": True}))
