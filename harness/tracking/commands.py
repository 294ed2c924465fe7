"""The ``report``, ``ui`` and ``report-bench`` commands (registered in :mod:`harness.cli`).

Only Typer and the standard library are imported at module level: ``bench.py --help`` must
not pay for importing MLflow.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from harness.errors import UserError

TrackingUriOption = Annotated[str | None, typer.Option(
    "--tracking-uri", metavar="URI",
    help="MLflow store: sqlite:///path/mlflow.db or http://host:port "
         "(default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db).")]

DEFAULT_GRID = "smoke"


def grid_name(grid: str) -> str:
    """A grid argument as an experiment name: a grid YAML path gives its experiment
    (``tracking.experiment``, else ``name:``, else the file's stem); anything else is taken as
    the grid or experiment name (or id) itself."""
    path = Path(grid)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"grid file {grid} does not exist: give a grid YAML or a grid name")
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{grid} is not valid YAML ({str(err).splitlines()[0]})") from None
        data = data if isinstance(data, dict) else {}
        tracking = data.get("tracking") if isinstance(data.get("tracking"), dict) else {}
        name = tracking.get("experiment") or data.get("name")
        return str(name) if name else path.stem
    return grid


def resolve_store(name: str, tracking_uri: str | None, runs_dir: Path) -> tuple[str, str, str | None]:
    """(tracking URI, experiment, note) for a report on grid ``name``.

    ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the store that ``bench.py ablate``
    recorded in ``<runs>/<grid>/grid.json`` (for Slurm grids an MLflow server: when it no longer
    answers, its SQLite file is read directly), else ``sqlite:///<cwd>/mlflow.db``.
    """
    import json
    import os

    from harness.tracking.server import STATE_FILE, read_state
    from harness.tracking.store import check_store, default_tracking_uri, is_http, sqlite_path

    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        return tracking_uri or default_tracking_uri(), name, None
    try:
        record = json.loads((runs_dir / name / "grid.json").read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not record.get("tracking_uri"):
        return default_tracking_uri(), name, None
    uri, experiment = record["tracking_uri"], record.get("experiment") or name
    if not is_http(uri):
        return uri, experiment, None
    try:
        check_store(uri, timeout_s=3)
        return uri, experiment, None
    except UserError:
        for state_file in [*runs_dir.glob(f".*/{STATE_FILE}"), *runs_dir.glob(f"*/{STATE_FILE}")]:
            info = read_state(state_file.parent)
            if info is not None and info.url.rstrip("/") == uri.rstrip("/"):
                store = sqlite_path(info.store_uri) if info.store_uri.startswith("sqlite:") else None
                if store is not None and store.is_file():
                    return info.store_uri, experiment, (f"the grid's MLflow server {uri} is not running: "
                                                        f"reading its store {store} directly")
        raise


def parse_formats(text: str) -> tuple[str, ...]:
    from harness.report.tables import TABLE_FORMATS

    formats = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in TABLE_FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown table format {', '.join(unknown) or repr(text)}: choose from "
                        f"{','.join(TABLE_FORMATS)} (comma-separated)")
    return formats


def report_command(
    grid: Annotated[str, typer.Argument(
        help="Grid name, grid YAML (e.g. ablations/smoke.yaml) or MLflow experiment name/id.")] = DEFAULT_GRID,
    tracking_uri: TrackingUriOption = None,
    metric: Annotated[str, typer.Option(help="Headline metric of the tables and figures.")] = "linear_top1",
    format_: Annotated[str, typer.Option(
        "--format", help="Table formats, comma-separated: md,csv,tex,html.")] = "md,csv,tex,html",
    out: Annotated[Path | None, typer.Option(help="Report folder (default: reports/<grid>/).")] = None,
    log_to_mlflow: Annotated[bool, typer.Option(
        "--log/--no-log", help="Also log report.md, tables and figures to the grid's newest parent run.")] = True,
    runs_dir: Annotated[Path, typer.Option(
        help="Where `bench.py ablate` recorded the grid's store (<runs>/<grid>/grid.json).")] = Path("runs"),
) -> None:
    """Tables, figures and report.md for a grid's runs in MLflow (failed cells included)."""
    import time

    from harness.tracking.store import bounded_http, display_uri

    start = time.perf_counter()
    name = grid_name(grid)
    formats = parse_formats(format_)
    from harness.report.build import build_report
    from harness.report.ingest import load_runs
    from harness.report.tables import ReportError

    with bounded_http():
        uri, experiment, note = resolve_store(name, tracking_uri, runs_dir)
        if note:
            typer.secho(f"note: {note}", err=True)
        runs, curves = load_runs(uri, experiment)
        if runs.empty:
            raise UserError(f"grid {name!r} has no cell runs in {display_uri(uri)} yet: run "
                            f"`bench.py ablate` first")
        out_dir = out or Path("reports") / runs.attrs.get("grid", name)
        try:
            result = build_report(runs, curves, out_dir, metric=metric, formats=formats)
        except ReportError as err:
            raise UserError(str(err)) from None
        counts = runs["status"].value_counts()
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        typer.echo(f"{result.report}: {runs['cell_id'].nunique()} cells, {len(runs)} runs ({summary}); "
                   f"{len(result.tables)} tables, {len(result.figures)} figures "
                   f"in {time.perf_counter() - start:.1f} s")
        parent = runs.attrs.get("parent_run_id")
        if log_to_mlflow and parent:
            from harness.tracking.runs import log_files

            try:
                log_files(uri, parent, result.files, out_dir, artifact_path="report")
                typer.echo(f"logged to MLflow run {parent} (artifacts report/)")
            except Exception as err:  # noqa: BLE001 - the report itself is written
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                typer.secho(f"warning: could not log the report to MLflow run {parent}: {first[:200]}",
                            fg=typer.colors.YELLOW, err=True)


def ui_command(
    tracking_uri: TrackingUriOption = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on 127.0.0.1 for the store; runs until Ctrl-C."""
    from harness.tracking.server import port_in_use, serve_ui
    from harness.tracking.store import check_store, default_tracking_uri, display_uri, is_http

    uri = tracking_uri or default_tracking_uri()
    if is_http(uri):
        typer.echo(f"{display_uri(uri)} is an MLflow server: its UI is at that address already")
        return
    if port_in_use(port, "127.0.0.1"):
        raise UserError(f"port {port} on 127.0.0.1 is in use: pick another with --port")
    check_store(uri)
    typer.echo(f"starting the MLflow UI for {display_uri(uri)} ...", err=True)

    def ready(url: str, log_path: Path) -> None:
        typer.echo(f"MLflow UI: {url}  (server log: {log_path}; Ctrl-C to stop)")
        for name, link in experiment_links(uri, url):
            typer.echo(f"  {name}: {link}")
        sys.stdout.flush()

    code = serve_ui(uri, port=port, host="127.0.0.1", on_ready=ready)
    if code:
        raise typer.Exit(code)


def experiment_links(uri: str, url: str, limit: int = 10) -> list[tuple[str, str]]:
    """(experiment, link to its runs table) for the store's grids. MLflow 3's UI opens an
    experiment on its GenAI overview; ``workflowType=machine_learning`` shows the runs."""
    try:
        from harness.tracking.store import client

        experiments = client(uri).search_experiments(max_results=limit + 1, order_by=["last_update_time DESC"])
    except Exception:  # noqa: BLE001 - links are a convenience
        return []
    return [(e.name, f"{url}/#/experiments/{e.experiment_id}/runs?workflowType=machine_learning")
            for e in experiments if e.name != "Default"][:limit]


def report_bench_command(
    runs: Annotated[int, typer.Option(help="Number of synthetic finished runs.")] = 1000,
    steps: Annotated[int, typer.Option(help="Loss points per run.")] = 100,
    store: Annotated[Path | None, typer.Option(
        help="SQLite file to fill (reused when it already holds the grid; default: a temp file).")] = None,
) -> None:
    """Time a report over synthetic runs read from a real SQLite MLflow store (prints seconds)."""
    from harness.report.mlflow_bench import report_lines, run_benchmark

    typer.echo(report_lines(run_benchmark(runs, steps, store)))
