"""``ablate``'s last step: follow the cells. Print a line whenever a cell changes state, wait until
every cell has settled, then show the failures, send the store what it still lacks, and end the
invocation's parent run. A Slurm submission that does not wait says how to follow it instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from harness.grid import Cell, Grid
from harness.launch import display
from harness.launch.cell_views import CellView, collect
from harness.launch.records import GridRecord, close_parent_if_settled
from harness.launch.register import send_backlog
from harness.run.cell_state import CellState

Echo = Callable[[str], None]
POLL_S = {"slurm": 5.0, "local": 2.0}


class StateChanges:
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


def wait_for_cells(changes: StateChanges, poll_s: float) -> list[CellView]:
    """Poll folders and the scheduler until every cell is over and its job gone."""
    while not all(v.settled for v in changes.update()):
        time.sleep(poll_s)
    return changes.views


def finish(gdir: Path, record: GridRecord, final: Sequence[CellView], echo: Echo) -> None:
    """Show the failures; end the invocation's parent run (when its jobs have not)."""
    if details := display.failure_details([v for v in final if v.state == CellState.FAILED]):
        echo(details)
    if record.store is not None:
        send_backlog(collect([v.folder for v in final]), record.store, echo)
        close_parent_if_settled(gdir)


def how_to_follow(grid: Grid, gdir: Path, runs_dir: Path, default_runs_dir: Path, echo: Echo) -> None:
    runs = f" --runs-dir {runs_dir}" if runs_dir != default_runs_dir else ""
    echo(f"follow with: python bench.py status {grid.name}{runs}   (or squeue -n milan-{grid.name}); "
         "to wait for the end and the report, repeat this ablate command with --wait")
    echo(f"run folders: {gdir}/<cell>/ (launch.json, status.json, logs/)")
