"""A grid's report from its MLflow runs: what ``bench.py report`` and the end of ``bench.py ablate`` do.

Find the store, read the runs, write tables, figures and report.md, and log them to the grid's
newest parent run. Only the standard library at module level: the CLI imports this lazily.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from harness.config import load_yaml
from harness.core.errors import UserError

Echo = Callable[[str], None]

REPORTS_DIR = Path("reports")


def grid_name(grid: str) -> str:
    """A grid argument as an experiment name: a grid YAML path gives its experiment
    (``tracking.experiment``, else ``name:``, else the file's stem); anything else is taken as
    the grid or experiment name (or id) itself."""
    path = Path(grid)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"grid file {grid} does not exist: give a grid YAML or a grid name")
        data = load_yaml(path)
        tracking = data.get("tracking") if isinstance(data.get("tracking"), dict) else {}
        name = tracking.get("experiment") or data.get("name")
        return str(name) if name else path.stem
    return grid


def write_grid_report(
    grid: str,
    *,
    tracking_uri: str | None,
    metric: str,
    formats: Iterable[str],
    out: Path | None,
    log_report: bool,
    runs_dir: Path,
    margin: float | None = None,
    echo: Echo = print,
    warn: Echo | None = None,
) -> None:
    """Tables, figures and report.md for the runs of ``grid`` (a name, grid YAML or experiment)
    under ``out`` (default ``reports/<grid>/``), with verdicts at ``margin`` (default: the grid's);
    the verdict table, the verdicts in words and one summary line go to ``echo``, notes and
    warnings to ``warn`` (default ``echo``). Bad input raises a one-line UserError."""
    from harness.report.build import build_report
    from harness.report.effects import format_effects_for_terminal
    from harness.report.sequential import read_state
    from harness.report.tables import ReportError
    from harness.tracking import bounded_http, display_uri, log_artifacts, resolve_store
    from harness.tracking.read import load_runs

    warn = warn or echo
    start = time.perf_counter()
    name = grid_name(grid)
    formats = tuple(formats)
    with bounded_http():
        uri, experiment, note = resolve_store(name, tracking_uri, runs_dir)
        if note:
            warn(f"note: {note}")
        runs, curves = load_runs(uri, experiment)
        if runs.empty:
            raise UserError(f"grid {name!r} has no cell runs in {display_uri(uri)} yet: run "
                            f"`bench.py ablate` first")
        out_dir = out or REPORTS_DIR / runs.attrs.get("grid", name)
        sequential = read_state(Path(runs_dir) / runs.attrs.get("grid", name))  # ablate --until-resolved's looks
        try:
            result = build_report(runs, curves, out_dir, metric=metric, formats=formats, margin=margin,
                                  sequential=sequential)
        except ReportError as err:
            raise UserError(str(err)) from None
        echo(format_effects_for_terminal(result.effects))
        echo(result.headline.replace("**", ""))
        counts = runs["status"].value_counts()
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        echo(f"{result.report}: {runs['cell_id'].nunique()} cells, {len(runs)} runs ({summary}); "
             f"{len(result.tables)} tables, {len(result.figures)} figures "
             f"in {time.perf_counter() - start:.1f} s")
        parent = runs.attrs.get("parent_run_id")
        if log_report and parent:
            try:
                log_artifacts(uri, parent, result.files, out_dir, prefix="report")
                echo(f"logged to MLflow run {parent} (artifacts report/)")
            except Exception as err:  # noqa: BLE001 - the report itself is written
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                warn(f"warning: could not log the report to MLflow run {parent}: {first[:200]}")
