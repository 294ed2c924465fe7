"""The `bench.py` / `milan-bench` command line: a thin Typer front over the harness modules.

Every command turns a :class:`~harness.core.errors.UserError` into one line on stderr and exit code
2; anything else is a bug and keeps its traceback.
"""

import functools
import gc
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from harness.core.errors import UserError
from harness.core.files import ensure_writable_dir

app = typer.Typer(
    name="milan-bench",
    help="Benchmark and ablate MILAN masked-image pretraining: run cells, grids, reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: generate the demo data.", no_args_is_help=True)
teacher_app = typer.Typer(help="CLIP teachers: train the demo teacher, list models.", no_args_is_help=True)
server_app = typer.Typer(help="The MLflow server that `ablate` starts for Slurm jobs: status, stop.",
                         no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")
app.add_typer(server_app, name="server")

F = TypeVar("F", bound=Callable[..., Any])

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", metavar="KEY=VALUE",
    help="Override a config field by its dotted name, e.g. --set model.mask_ratio=0.9 (repeatable).")]


def user_errors(fn: F) -> F:
    """Print a UserError as one line and exit 2, without a traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
    return wrapper  # type: ignore[return-value]


def check_counts(*checks: tuple[str, int | float | None, int]) -> None:
    """Each ``(option, value, least)``: a one-line UserError naming the option unless ``value >= least``
    (``None``: not given). A typer ``min=`` would print click's multi-line usage box instead."""
    for option, value, least in checks:
        if value is not None and not value >= least:
            raise UserError(f"{option} {value} is too small: give an integer >= {least}")


def configure_logging() -> None:
    import logging
    # force: a library that logged through the root logger before this (open_clip loading the
    # teacher in preflight) has already given it a WARNING-level handler
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)


def print_metrics(metrics: dict[str, float]) -> None:
    width = max(map(len, metrics), default=0)
    for key, value in metrics.items():
        typer.echo(f"  {key:<{width}}  {value:.4g}")


# --- one cell -----------------------------------------------------------------------------------

@app.command("run")
@user_errors
def run_command(
    config: Annotated[Path | None, typer.Argument(help="Run config YAML (defaults apply to missing fields).")] = None,
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<config name>/<run id>).")] = None,
) -> None:
    """Pretrain one cell, then evaluate its encoder; resumes an interrupted run in the same folder."""
    from harness.config import load_config, parse_assignments

    cfg = load_config(config, parse_assignments(set_ or []))  # config errors before heavy imports
    from harness.run.checks import preflight
    from harness.run.runner import run

    preflight(cfg)
    run_dir = out or Path("runs") / (config.stem if config else "default") / cfg.run_id()
    ensure_writable_dir(run_dir, "--out" if out else "run folder")
    typer.echo(f"run {cfg.run_id()} -> {run_dir}")
    configure_logging()
    start = time.perf_counter()
    result = run(cfg, run_dir)
    elapsed = time.perf_counter() - start
    if result.state != "done":
        typer.secho(f"run failed: {result.failure_reason}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    typer.echo(f"done in {elapsed:.1f} s; metrics:")
    print_metrics(result.metrics)


@app.command("evaluate")
@user_errors
def evaluate_command(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="Pretraining checkpoint (MILAN/MAE/harness, weights under 'model').")] = None,
    random_init: Annotated[bool, typer.Option(
        "--random-init", help="Evaluate a randomly initialised encoder of model.size (a baseline).")] = False,
    config: Annotated[Path | None, typer.Option(help="Run config YAML for data and evaluation settings.")] = None,
    set_: SetOption = None,
) -> None:
    """Evaluate a pretrained (or random-init) encoder with the config's protocols."""
    import torch

    from harness.config import load_config, parse_assignments
    from harness.milan.weights import build_timm_vit, timm_encoder_from_checkpoint
    from harness.run.checks import preflight
    from harness.run.evaluation import evaluate_encoder
    from harness.core.distributed import resolve_device

    if (checkpoint is None) == (not random_init):
        raise UserError("give either a CHECKPOINT or --random-init (not both)")
    cfg = load_config(config, parse_assignments(set_ or []))
    if checkpoint is not None:
        vit, size, img_size = timm_encoder_from_checkpoint(checkpoint)
        typer.echo(f"encoder {size} at {img_size}px from {checkpoint}")
    else:
        torch.manual_seed(cfg.seed)
        vit = build_timm_vit(cfg.model.size, cfg.model.img_size)
        typer.echo(f"random-init encoder {cfg.model.size} at {cfg.model.img_size}px (seed {cfg.seed})")
    preflight(cfg.with_overrides({"model.target": "pixel", "model.masking": "random"}))
    configure_logging()
    metrics = evaluate_encoder(vit, cfg, resolve_device(cfg.runtime.device))
    print_metrics(metrics)


# --- grids ---------------------------------------------------------------------------------------

def _parse_axes(pairs: list[str]) -> dict[str, list[Any]]:
    """["model.mask_ratio=0.5,0.9", ...] -> {"model.mask_ratio": [0.5, 0.9]} (values as YAML)."""
    from harness.config import parse_value

    axes: dict[str, list[Any]] = {}
    for pair in pairs:
        name, sep, values = pair.partition("=")
        parsed = parse_value(f"[{values}]") if sep else None
        if not name.strip() or not isinstance(parsed, list) or not parsed:
            raise UserError(f"--axis {pair!r} is not field=v1,v2: write e.g. --axis model.mask_ratio=0.5,0.75")
        axes[name.strip()] = parsed
    return axes


def _check_margin(value: float | None) -> None:
    """A UserError (one line, exit 2) from inside the command: a click callback's BadParameter
    would print click's multi-line usage box instead."""
    if value is not None and not 0 < value < float("inf"):
        raise UserError(f"--margin {value:g} is not a margin: give a positive number of points, e.g. 0.5")


MarginOption = Annotated[float | None, typer.Option(
    metavar="POINTS",
    help="Equivalence margin of the verdicts, in points of the headline metric: an effect whose whole "
         "95% interval lies within ±POINTS is negligible (default: the grid file's margin, else 0.5).")]


@app.command("ablate")
@user_errors
def ablate_command(
    grid: Annotated[str | None, typer.Argument(
        help="Grid YAML, or the name of a shipped grid in ablations/ (default: the smoke grid, run locally).")] = None,
    set_: SetOption = None,
    axis: Annotated[list[str] | None, typer.Option(
        "--axis", "-a", metavar="FIELD=V1,V2",
        help="Add or replace an axis, e.g. --axis model.mask_ratio=0.5,0.9; for a variant axis "
             "the values pick variants (repeatable).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Run seeds 0..N-1 instead of the grid's seeds.")] = None,
    executor: Annotated[str, typer.Option(
        help="local | slurm | debug | auto (slurm if sinfo answers, else local; local without GRID).")] = "auto",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show the cells, their cost estimate and status; submit nothing.")] = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the cells until all end, then write the report (local runs always wait).")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Rerun every cell in a fresh folder (cancels its running jobs).")] = False,
    tracking_uri: Annotated[str | None, typer.Option(
        help="MLflow tracking URI (default: the grid's, else ./mlflow.db locally, or an MLflow server "
             "on this host for Slurm jobs).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the grids' run folders go.")] = Path("runs"),
    cell: Annotated[list[str] | None, typer.Option(
        "--cell", metavar="TEXT",
        help="Only the cells whose folder or name contains TEXT (repeatable), e.g. with --force to "
             "rerun one cell from scratch.")] = None,
    margin: MarginOption = None,
    rehearse: Annotated[bool, typer.Option(
        "--rehearse", help="Run the grid's exact structure at micro scale (minutes) as <grid>-rehearsal, and "
                           "wait: proves the real grid works end to end before it spends its hours.")] = False,
    share: Annotated[bool, typer.Option(
        "--share/--no-share", help="Train the cells that differ only on the student side (target, decoder, "
                                   "masks, optimiser, evaluation) as one job: one data stream and one teacher "
                                   "forward per batch. --no-share: one job per cell.")] = True,
    until_resolved: Annotated[bool, typer.Option(
        "--until-resolved", help="Run the grid in rounds of seeds until every effect in scope is resolved or "
                                 "negligible (group-sequential verdicts, docs/until-resolved.md), within "
                                 "--max-seeds / --max-hours. On Slurm a decision job after each round submits "
                                 "the next; run it again to resume a stopped chain.")] = False,
    max_seeds: Annotated[int | None, typer.Option(
        help="--until-resolved: at most this many seeds in all.")] = None,
    max_hours: Annotated[float | None, typer.Option(
        help="--until-resolved: at most this many device-hours (GPU-hours, or CPU core-hours on CPUs).")] = None,
    effects: Annotated[str | None, typer.Option(
        metavar="A,B", help="--until-resolved: the effects that must resolve, e.g. target,decoder,random-init "
                            "(interactions as target:decoder; default: the main effects and pretrained vs "
                            "random init).")] = None,
) -> None:
    """Run an ablation grid: one job per group of cells that share data and teacher (or per cell with
    --no-share); finished cells are skipped, failed ones resumed."""
    from harness.config import parse_assignments
    from harness.report.grid_report import REPORTS_DIR

    _check_margin(margin)
    if not until_resolved and any(o is not None for o in (max_seeds, max_hours, effects)):
        raise UserError("--max-seeds, --max-hours and --effects go with --until-resolved")
    check_counts(("--max-seeds", max_seeds, 1))
    ensure_writable_dir(runs_dir, "--runs-dir")
    if not dry_run:
        ensure_writable_dir(REPORTS_DIR, "reports folder")
    from harness.launch.ablate import AblateRequest, ablate

    request = AblateRequest(grid=grid, sets=parse_assignments(set_ or []), axes=_parse_axes(axis or []),
                            seeds=seeds, executor=executor, dry_run=dry_run, wait=wait, force=force,
                            tracking_uri=tracking_uri, runs_dir=runs_dir, cells=tuple(cell or ()),
                            rehearse=rehearse, margin=margin, share=share)
    if until_resolved:
        _until_resolved(request, max_seeds, max_hours, effects)
        return
    try:
        outcome = ablate(request, echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("interrupted: the cells running here were stopped and resume from their last checkpoints; run "
                   "the same command again to continue (cells on Slurm keep running)", err=True)
        raise typer.Exit(130) from None
    if outcome.waited and outcome.record is not None and outcome.record.store is not None:
        from harness.report.grid_report import write_grid_report

        try:  # a report that cannot be built does not fail the grid
            write_grid_report(outcome.record.experiment, tracking_uri=outcome.record.store.reader_uri(),
                              metric=outcome.grid.headline_metric, formats=("md", "csv", "tex", "html"),
                              margin=margin, out=None, log_report=True, runs_dir=runs_dir, echo=typer.echo)
        except UserError as err:
            typer.echo(f"report: not written ({err})")
    if rehearse and outcome.waited:
        from harness.launch.display import rehearsal_verdict

        typer.echo(rehearsal_verdict(outcome.views, grid or "smoke"))
    if not outcome.ok:
        raise typer.Exit(1)


def _check_spending(name: str) -> str:
    from harness.report.sequential import SPENDING_NAMES

    if name not in SPENDING_NAMES:
        raise UserError(f"--spending {name!r} is not a spending function: use one of {', '.join(SPENDING_NAMES)}")
    return name


def _until_resolved(request: Any, max_seeds: int | None, max_hours: float | None, effects: str | None) -> None:
    """``ablate --until-resolved``: the chain of rounds (harness.launch.rounds) with the sequential
    statistics (harness.report.sequential); the report once a local chain has stopped."""
    from harness.launch.rounds import Budget, Statistics, until_resolved
    from harness.report import sequential

    statistics = Statistics(start=sequential.start, decide=sequential.decide, scope=sequential.scope_for,
                            schedule=sequential.look_schedule)
    names = [name for name in (effects or "").split(",") if name.strip()] or None
    try:
        # O'Brien-Fleming spending: Pocock's spent 6.0% (± 0.5) of a 5% alpha in calibrate-sequential
        chain = until_resolved(request, Budget(max_seeds, max_hours), names, sequential.OBRIEN_FLEMING, statistics,
                               echo=typer.echo)
    except KeyboardInterrupt:
        typer.echo("interrupted: run the same command again to resume the chain", err=True)
        raise typer.Exit(130) from None
    if chain.stop_reason:
        from harness.report.grid_report import write_grid_report

        try:  # a report that cannot be built does not fail the chain
            write_grid_report(request.grid or "smoke", tracking_uri=request.tracking_uri,
                              metric=chain.design["metric"], formats=("md", "csv", "tex", "html"),
                              margin=request.margin, out=None, log_report=True, runs_dir=request.runs_dir,
                              echo=typer.echo)
        except UserError as err:
            typer.echo(f"report: not written ({err})")


@app.command("status")
@user_errors
def status_command(
    grid: Annotated[str | None, typer.Argument(help="Grid name or YAML (default: every submitted grid).")] = None,
    runs_dir: Annotated[Path, typer.Option(help="Where the grids' run folders are.")] = Path("runs"),
    lines: Annotated[int, typer.Option(help="Log lines shown per failed cell.")] = 8,
) -> None:
    """Each cell's state (pending, running, requeued, preempted, done, failed) from its folder and Slurm."""
    check_counts(("--lines", lines, 1))
    from harness.launch.status import show_status

    show_status(grid, runs_dir, echo=typer.echo, log_lines=lines)


# --- demo data and teacher ----------------------------------------------------------------------

@data_app.command("demo")
@user_errors
def data_demo(
    root: Annotated[Path, typer.Argument(help="Folder to write the ImageFolder tree into.")] = Path("data/demo"),
    seed: int = 0,
    image_size: int = 32,
    train_per_class: int = 300,
    val_per_class: int = 150,
) -> None:
    """Generate the deterministic demo dataset (train/ and val/, ten shape classes, captions)."""
    ensure_writable_dir(root, "demo dataset folder")
    from harness.data.demo import make_demo_dataset

    start = time.perf_counter()
    info = make_demo_dataset(root, image_size=image_size, train_per_class=train_per_class,
                             val_per_class=val_per_class, seed=seed)
    counts = ", ".join(f"{n} {split}" for split, n in info.counts.items())
    typer.echo(f"{root}: {len(info.classes)} classes, {counts} images of {info.image_size}px "
               f"({time.perf_counter() - start:.1f} s)")


@teacher_app.command("demo")
@user_errors
def teacher_demo(
    data: Annotated[Path, typer.Option(help="Demo dataset (made if missing).")] = Path("data/demo"),
    out: Annotated[Path, typer.Option(help="Checkpoint to write.")] = Path("data/demo-teacher/milan-clip-tiny.pt"),
    epochs: Annotated[int, typer.Option(help="Training epochs (30 gives the README's 24.7% zero-shot).")] = 30,
    force: Annotated[bool, typer.Option(help="Retrain even if the checkpoint exists.")] = False,
) -> None:
    """Train a tiny open_clip model on the demo captions; report its zero-shot accuracy."""
    from harness.data.demo import make_demo_dataset
    from harness.data.demo_teacher import read_report, train_demo_teacher

    check_counts(("--epochs", epochs, 1))
    ensure_writable_dir(out.parent, "--out's folder")
    report = None if force else read_report(out)
    if report is None:
        make_demo_dataset(data)
        typer.echo(f"training the demo teacher on {data} ...")
        report = train_demo_teacher(data, out, epochs=epochs, echo=typer.echo)
    typer.echo(f"{report.checkpoint}: {report.model}, {report.epochs} epochs, zero-shot top-1 "
               f"{report.zero_shot_top1:.1f}% on val (chance {report.chance_top1:.1f}%), "
               f"trained in {report.seconds:.0f} s")


@teacher_app.command("list")
def teacher_list() -> None:
    """The open_clip ViT models usable as teachers (plus the shipped tiny ones)."""
    from harness.milan.teacher import vit_model_names
    typer.echo("\n".join(vit_model_names()))


# --- tracking and reports -----------------------------------------------------------------------

TrackingUriOption = Annotated[str | None, typer.Option(
    "--tracking-uri", metavar="URI",
    help="MLflow store: sqlite:///path/mlflow.db or http://host:port "
         "(default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db).")]


@app.command("report")
@user_errors
def report_command(
    grid: Annotated[str, typer.Argument(
        help="Grid name, grid YAML (e.g. ablations/smoke.yaml) or MLflow experiment name/id.")] = "smoke",
    tracking_uri: TrackingUriOption = None,
    metric: Annotated[str, typer.Option(help="Headline metric of the tables and figures.")] = "linear_top1",
    format_: Annotated[str, typer.Option(
        "--format", help="Table formats, comma-separated: md,csv,tex,html.")] = "md,csv,tex,html",
    out: Annotated[Path | None, typer.Option(help="Report folder (default: reports/<grid>/).")] = None,
    log_report: Annotated[bool, typer.Option(
        "--log/--no-log", help="Also log report.md, tables and figures to the grid's newest parent run.")] = True,
    runs_dir: Annotated[Path, typer.Option(
        help="Where `bench.py ablate` recorded the grid's store (<runs>/<grid>/grid.json).")] = Path("runs"),
    margin: MarginOption = None,
) -> None:
    """Tables, figures and report.md for a grid's runs in MLflow (failed cells included), with a
    verdict for every effect."""
    from harness.report.grid_report import REPORTS_DIR, write_grid_report
    from harness.report.tables import parse_formats

    _check_margin(margin)
    formats = parse_formats(format_)
    ensure_writable_dir(out or REPORTS_DIR, "--out" if out else "reports folder")
    write_grid_report(grid, tracking_uri=tracking_uri, metric=metric, formats=formats, margin=margin,
                      out=out, log_report=log_report, runs_dir=runs_dir, echo=typer.echo,
                      warn=lambda line: typer.secho(line, err=True))


@app.command("ui")
@user_errors
def ui_command(
    tracking_uri: TrackingUriOption = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
) -> None:
    """Start the MLflow UI on 127.0.0.1 for the store; runs until Ctrl-C."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is not a TCP port: give one in 1..65535 (e.g. 5000)")
    from harness.tracking import check_store, default_tracking_uri, display_uri, experiment_links, is_http, port_in_use, \
        serve_ui

    uri = tracking_uri or default_tracking_uri()
    if is_http(uri):
        check_store(uri)  # a server that does not answer is an error, not a UI to point at
        typer.echo(f"{display_uri(uri)} is an MLflow server: its UI is at that address already")
        return
    if port_in_use(port, "127.0.0.1"):
        raise UserError(f"port {port} on 127.0.0.1 is in use: pick another with --port")
    check_store(uri, must_exist=True)  # the UI opens a store; it never creates or migrates one
    typer.echo(f"starting the MLflow UI for {display_uri(uri)} ...", err=True)

    def ready(url: str, log_path: Path) -> None:
        typer.echo(f"MLflow UI: {url}  (server log: {log_path}; Ctrl-C to stop)")
        for name, link in experiment_links(uri, url):
            typer.echo(f"  {name}: {link}")
        sys.stdout.flush()

    code = serve_ui(uri, port=port, on_ready=ready)
    if code:
        raise typer.Exit(code)


RunsDirOption = Annotated[Path, typer.Option(help="The runs folder whose grids the server serves.")]


@server_app.command("status")
@user_errors
def server_status(runs_dir: RunsDirOption = Path("runs")) -> None:
    """Whether the MLflow server of the runs folder runs, where, and over which store."""
    from harness.tracking import SERVER_DIR, read_state, server_answers

    info = read_state(runs_dir / SERVER_DIR)
    if info is None:
        typer.echo(f"no MLflow server is recorded under {runs_dir}: `bench.py ablate --executor slurm` starts one")
        return
    state = "answers" if server_answers(info.url) else "does not answer"
    typer.echo(f"MLflow server {info.url} {state} (process group {info.pgid}, store {info.store_uri}, "
               f"log {info.log_path})")


@server_app.command("stop")
@user_errors
def server_stop(runs_dir: RunsDirOption = Path("runs")) -> None:
    """Stop the MLflow server that `ablate` started for the runs folder (its whole process group). Jobs
    still running keep their metrics in their run folders; the next `ablate` restarts the server and
    sends them."""
    from harness.tracking import SERVER_DIR, stop_server

    if stop_server(runs_dir / SERVER_DIR):
        typer.echo(f"stopped the MLflow server of {runs_dir}")
    else:
        typer.echo(f"no MLflow server of {runs_dir} was running")


@app.command("report-bench")
@user_errors
def report_bench_command(
    runs: Annotated[int, typer.Option(help="Number of synthetic finished runs.")] = 1000,
    steps: Annotated[int, typer.Option(help="Loss points per run.")] = 100,
    store: Annotated[Path | None, typer.Option(
        help="SQLite file to fill (reused when it already holds the grid; default: a temp file).")] = None,
) -> None:
    """Time a report over synthetic runs read from a real SQLite MLflow store and their run folders
    (prints seconds)."""
    check_counts(("--runs", runs, 1), ("--steps", steps, 1))
    if store is not None:
        ensure_writable_dir(store.parent, "--store's folder")
    from harness.benchmarks.report_bench import report_lines, run_benchmark

    typer.echo(report_lines(run_benchmark(runs, steps, store)))


@app.command("calibrate")
@user_errors
def calibrate_command(
    grids: Annotated[int, typer.Option(help="Simulated grids per figure (3000: about ±0.4 points on a 5% rate).")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed of every simulated draw.")] = 0,
) -> None:
    """Calibrate the report's statistics by simulation: interval coverage, false resolutions
    (3 seeds, 1 seed) and power on synthetic 2x2x2 grids, each against its requirement."""
    if grids < 1:
        raise UserError(f"--grids {grids} is too few: give at least 1 (e.g. 3000)")
    from harness.benchmarks.calibration import calibrate, report_lines

    typer.echo(report_lines(calibrate(grids, seed)))


@app.command("calibrate-sequential")
@user_errors
def calibrate_sequential_command(
    grids: Annotated[int, typer.Option(help="Simulated chains per scenario (2000: about ±0.5 points on a 5% rate).")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of every simulated draw.")] = 0,
    margin: Annotated[float, typer.Option(help="Equivalence margin, in points.")] = 0.5,
    noise_sd: Annotated[float, typer.Option(help="Run-to-run noise sd, in points (default: the demo's).")] = 0.59,
    first_seeds: Annotated[int, typer.Option(help="Seeds of the first round.")] = 3,
    max_seeds: Annotated[int, typer.Option(help="The budget cap, in seeds.")] = 12,
    effects: Annotated[str | None, typer.Option(
        metavar="A,B", help="The effects in scope, as ablate's --effects; must hold target (default: the main "
                            "effects and pretrained vs random init).")] = None,
    spending: Annotated[str, typer.Option(
        help="Alpha spending: obrien-fleming (ablate's) | pocock (measured for comparison).")] = "obrien-fleming",
) -> None:
    """Calibrate the --until-resolved verdicts by simulation: false resolved (null), false negligible
    (twice the margin), power and seeds used (the margin) on chains of looks at synthetic 2x2x2 grids."""
    check_counts(("--grids", grids, 1), ("--first-seeds", first_seeds, 2), ("--max-seeds", max_seeds, first_seeds))
    _check_margin(margin)
    if not noise_sd > 0:
        raise UserError(f"--noise-sd {noise_sd:g} is not a noise level: give a positive number of points")
    from harness.benchmarks.sequential_calibration import calibrate_sequential, report_lines

    names = [name for name in (effects or "").split(",") if name.strip()] or None
    try:
        result = calibrate_sequential(grids, seed, noise_sd=noise_sd, margin=margin, first_seeds=first_seeds,
                                      max_seeds=max_seeds, effects=names, spending=_check_spending(spending))
    except ValueError as err:
        raise UserError(str(err)) from None
    typer.echo(report_lines(result))


@app.command("share-bench")
@user_errors
def share_bench_command(
    seeds: Annotated[int, typer.Option(help="Seeds of the smoke grid in each run (3: the interval comparison).")] = 3,
    out: Annotated[Path, typer.Option(help="Where the runs and their SQLite stores go.")] = Path("runs/share-bench"),
    independent: Annotated[bool, typer.Option(
        "--independent/--no-independent", help="Also run every cell with seeds of its own, to compare the "
                                               "intervals of paired and independent cells.")] = True,
) -> None:
    """What group jobs save and what pairing buys: the smoke grid shared vs --no-share (wall, CPU-s,
    images decoded, teacher forwards, per-cell metrics), interval widths with paired vs independent
    cells, and the paper grid's FLOPs per image shared vs not. Runs the grid here (minutes)."""
    if seeds < 1:
        raise UserError(f"--seeds {seeds} is too few: give at least 1 (3 for the interval comparison)")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty: the benchmark starts from nothing; remove it or give another")
    ensure_writable_dir(out, "--out")
    from harness.benchmarks.share_bench import report_lines, share_bench

    typer.echo(report_lines(share_bench(out, seeds, independent and seeds > 1)))


@app.command("finetune-bench")
@user_errors
def finetune_bench_command(
    ranks: Annotated[list[int] | None, typer.Option(
        "--ranks", help="Numbers of ranks to compare (repeatable; default 1 and 2).")] = None,
    size: Annotated[str, typer.Option(help="Encoder preset.")] = "vit_micro_patch4",
    images: Annotated[int, typer.Option(min=1, help="Synthetic training images.")] = 1024,
    batch: Annotated[int, typer.Option(min=2, help="Effective batch (split over the ranks).")] = 64,
) -> None:
    """Fine-tune images/s on 1 rank vs several (DDP over gloo on CPU): prints one line per count."""
    from harness.benchmarks.finetune_speed import run_finetune_speed
    from harness.milan.presets import PRESETS

    if size not in PRESETS:
        raise UserError(f"unknown preset {size!r}: choose one of {', '.join(PRESETS)}")
    for count in ranks or [1, 2]:
        if count < 1 or batch % count:
            raise UserError(f"--ranks {count}: the batch of {batch} must split over the ranks")
    for count in ranks or [1, 2]:
        result = run_finetune_speed(count, size=size, images=images, batch=batch)
        typer.echo(f"{count} rank(s): {result.images_per_s:.1f} images/s ({result.images} images in "
                   f"{result.seconds:.2f} s, {size}, effective batch {batch})")


@app.command("seg-bench")
@user_errors
def seg_bench_command(
    size: Annotated[str, typer.Option(help="Encoder preset.")] = "vit_micro_patch4",
    crop: Annotated[int, typer.Option(min=1, help="Crop side in pixels (a multiple of the patch size).")] = 32,
    batch: Annotated[int, typer.Option(min=2, help="Crops per step.")] = 16,
    channels: Annotated[int, typer.Option(min=1, help="The decode head's width (the paper's: 768).")] = 64,
    iterations: Annotated[int, typer.Option(min=1, help="Timed training steps.")] = 20,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """seg_upernet training images/s here, and an estimate of the paper's 160k-iteration ADE20K
    schedule in GPU-hours at assumed sustained rates."""
    import torch

    from harness.benchmarks.seg_speed import (ASSUMED_TFLOPS, PAPER_BATCH, PAPER_ITERATIONS, gpu_hours, measure,
                                              paper_schedule_flops)
    from harness.core.distributed import resolve_device
    from harness.milan.presets import PRESETS

    if size not in PRESETS:
        raise UserError(f"unknown preset {size!r}: choose one of {', '.join(PRESETS)}")
    if crop % PRESETS[size].patch_size:
        raise UserError(f"--crop {crop} is not a multiple of the {size} patch size {PRESETS[size].patch_size}")
    where = resolve_device(device)
    result = measure(size, crop, batch, channels, iterations, where)
    typer.echo(f"seg_upernet training, {size} at {crop}px, batch {batch}, head width {channels}, {where.type} "
               f"({torch.get_num_threads()} thread(s)): {result.images_per_s:.1f} images/s ({result.seconds_per_iteration:.3f} "
               f"s/iteration; {result.flops_per_image / 1e9:.2f} GFLOPs per image, {result.tflops:.3f} TFLOP/s)")
    flops = paper_schedule_flops()
    typer.echo(f"the paper's schedule: {PAPER_ITERATIONS:,} iterations x {PAPER_BATCH} crops of 512px, ViT-B/16 "
               f"UperNet: {flops / (PAPER_ITERATIONS * PAPER_BATCH) / 1e9:,.0f} GFLOPs per crop, {flops:.2e} in all")
    for gpu, tflops in ASSUMED_TFLOPS.items():
        typer.echo(f"estimate, not a measurement: on one {gpu}: {gpu_hours(flops, tflops):.0f} GPU-hours")


# --- speed -------------------------------------------------------------------------------------

@app.command("speed")
@user_errors
def speed_command(
    size: Annotated[str, typer.Option(help="Student preset.")] = "vit_base_patch16",
    img_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 224,
    batch: Annotated[int, typer.Option(help="Images per step (per student).")] = 8,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16")] = "auto",
    cells: Annotated[str, typer.Option(help="Cells, comma-separated: mae, clip, milan.")] = "mae,clip,milan",
    compile: Annotated[str, typer.Option(
        help="Compile modes, comma-separated: off (eager), student (runtime.compile's), all (teacher too).")] = "off",
    compile_cells: Annotated[str | None, typer.Option(
        help="The cells measured compiled (default: every cell of --cells); eager rows are always measured.")] = None,
    group: Annotated[bool, typer.Option(help="Also the group job of the grid's 8 cells (one teacher forward).")] = True,
    max_batch: Annotated[int, typer.Option(
        help="Search the largest batch of the last cell that fits, doubling up to this (0: no search).")] = 0,
    loader_workers: Annotated[str, typer.Option(
        help="Loader worker counts to measure JPEG decode + crop, comma-separated ('' for none).")] = "",
    end_to_end: Annotated[str, typer.Option(
        help="The last cell fed by the loop's data stream: decode:workers pairs, e.g. cpu:15,gpu:4 ('' for none).")] = "",
    teacher: Annotated[str | None, typer.Option(help="open_clip teacher, random init (default: one with the student's patch size).")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per row.")] = 3,
    warmup: Annotated[int, typer.Option(help="Untimed steps first (compilation happens there).")] = 1,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: all cores).")] = None,
    budget_s: Annotated[float, typer.Option(help="Start no row after this many seconds.")] = 3600,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the table as JSON here.")] = None,
) -> None:
    """Training-step throughput and MFU of the pretraining loop's own step, per cell, compiled or not,
    for a group job, at the largest batch that fits; and the loader's images/s per CPU core."""
    check_counts(("--img-size", img_size, 1), ("--batch", batch, 1), ("--steps", steps, 1), ("--warmup", warmup, 0),
                 ("--threads", threads, 1), ("--max-batch", max_batch, 0))
    chosen, modes = [c.strip() for c in cells.split(",") if c.strip()], [m.strip() for m in compile.split(",") if m.strip()]
    workers = [w.strip() for w in loader_workers.split(",") if w.strip()]
    compiled = [c.strip() for c in compile_cells.split(",") if c.strip()] if compile_cells is not None else chosen
    from harness.benchmarks.speed import CELLS, COMPILE_MODES

    if not chosen or any(c not in CELLS for c in chosen) or any(c not in chosen for c in compiled):
        raise UserError(f"--cells {cells!r} / --compile-cells: choose from {', '.join(CELLS)}, comma-separated "
                        "(compiled cells among --cells)")
    if not modes or any(m not in COMPILE_MODES for m in modes):
        raise UserError(f"--compile {compile!r}: choose from {', '.join(COMPILE_MODES)}, comma-separated")
    if any(not w.isdigit() for w in workers):
        raise UserError(f"--loader-workers {loader_workers!r}: give worker counts, e.g. 1,4,8")
    feeds = [f.strip().partition(":") for f in end_to_end.split(",") if f.strip()]
    if any(decode not in ("cpu", "gpu") or not sep or not count.isdigit() for decode, sep, count in feeds):
        raise UserError(f"--end-to-end {end_to_end!r}: give decode:workers pairs, e.g. cpu:15,gpu:4")
    if precision not in ("auto", "fp32", "bf16"):
        raise UserError(f"unknown precision {precision!r}: choose auto, fp32 or bf16")
    if json_out is not None:
        ensure_writable_dir(json_out.parent, "--json-out's folder")
    import json

    import pandas as pd
    import torch

    from harness.benchmarks.speed import default_teacher_for, feeding_lines, run_speed
    from harness.core.distributed import resolve_device
    from harness.milan.presets import PRESETS

    if size not in PRESETS:
        raise UserError(f"unknown model size {size!r}: choose one of {', '.join(PRESETS)}")
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    precision = precision if precision != "auto" else ("bf16" if dev.type == "cuda" else "fp32")
    report = run_speed(cells=chosen, size=size, img_size=img_size, batch=batch, device=dev, precision=precision,
                       teacher_model=teacher or default_teacher_for(size), steps=steps, warmup=warmup,
                       compile_modes=modes, compiled_cells=compiled, group=group, max_batch=max_batch or None,
                       loader_workers=[int(w) for w in workers],
                       end_to_end=[(decode, int(count)) for decode, _, count in feeds], budget_s=budget_s, echo=typer.echo)
    table = pd.DataFrame([r.__dict__ for r in report.rows])
    typer.echo(f"\n{size} at {img_size}px on {report.device}, {precision}, {torch.get_num_threads()} CPU threads; "
               f"matmul peak {report.peak_tflops:.1f} TFLOP/s; MFU = FLOPs (project counter) x images/s / peak")
    typer.echo(table.drop(columns=["cores"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for line in feeding_lines(report):
        typer.echo(line)
    if json_out is not None:
        json_out.write_text(json.dumps(report.as_dict(), indent=2))
        typer.echo(f"wrote {json_out}")


def main() -> None:
    """Entry point of ``bench.py`` and the ``milan-bench`` script."""
    try:
        app()
    finally:
        # The commands import torch, torchvision, timm, open_clip and MLflow: half a million
        # objects whose final garbage collections at interpreter exit took ~10 s on a 2-core
        # machine, longer than a Slurm submission itself. Freezing them skips those scans; the
        # OS frees the memory, and files and atexit hooks are handled without the collector.
        gc.freeze()
