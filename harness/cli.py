"""The `bench.py` / `milan-bench` command line: a thin Typer front over the harness modules.

Every command turns a :class:`~harness.errors.UserError` into one line on stderr and exit code
2; anything else is a bug and keeps its traceback.
"""

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from harness.errors import UserError

app = typer.Typer(
    name="milan-bench",
    help="Benchmark and ablate MILAN masked-image pretraining: run cells, grids, reports.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Datasets: generate the demo data.", no_args_is_help=True)
teacher_app = typer.Typer(help="CLIP teachers: train the demo teacher, list models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(teacher_app, name="teacher")

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


def configure_logging() -> None:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


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
    out: Annotated[Path | None, typer.Option(help="Run folder [default: runs/<config name>/<run id>].")] = None,
) -> None:
    """Pretrain one cell, then evaluate its encoder; resumes an interrupted run in the same folder."""
    from harness.config import load_config, parse_assignments
    from harness.run import preflight, run

    cfg = load_config(config, parse_assignments(set_ or []))
    preflight(cfg)
    run_dir = out or Path("runs") / (config.stem if config else "default") / cfg.run_id()
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
    from harness.milan.checkpoint import build_timm_vit, timm_encoder_from_checkpoint
    from harness.run import evaluate_encoder, preflight
    from harness.train.pretrain import resolve_device

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


# --- demo data and teacher ----------------------------------------------------------------------

@data_app.command("demo")
@user_errors
def data_demo(
    root: Annotated[Path, typer.Argument(help="Folder to write the ImageFolder tree into.")] = Path("data/demo"),
    seed: int = 0,
    image_size: int = 32,
    train_per_class: int = 300,
    val_per_class: int = 60,
) -> None:
    """Generate the deterministic demo dataset (train/ and val/, ten shape classes, captions)."""
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
    epochs: int = 12,
    force: Annotated[bool, typer.Option(help="Retrain even if the checkpoint exists.")] = False,
) -> None:
    """Train a tiny open_clip model on the demo captions; report its zero-shot accuracy."""
    from harness.data.demo import make_demo_dataset
    from harness.data.demo_teacher import read_report, train_demo_teacher

    report = None if force else read_report(out)
    if report is None:
        make_demo_dataset(data)
        typer.echo(f"training the demo teacher on {data} ...")
        report = train_demo_teacher(data, out, epochs=epochs)
    typer.echo(f"{report.checkpoint}: {report.model}, {report.epochs} epochs, zero-shot top-1 "
               f"{report.zero_shot_top1:.1f}% on val (chance {report.chance_top1:.1f}%), "
               f"trained in {report.seconds:.0f} s")


@teacher_app.command("list")
def teacher_list() -> None:
    """The open_clip ViT models usable as teachers (plus the shipped tiny ones)."""
    from harness.milan.teacher import vit_model_names
    typer.echo("\n".join(vit_model_names()))


def main() -> None:
    app()
