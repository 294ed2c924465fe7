"""Build a full report for one grid: tables in every format, figures and `report.md`.

Layout under `out_dir`: `report.md`, `tables/<name>.<fmt>`, `figures/<name>.png`; the
report links tables and embeds figures by relative path, so the folder can be moved.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from harness.grid import DEFAULT_MARGIN
from harness.report.effects import estimate_effects
from harness.report.figures import (
    metric_label,
    plot_cost,
    plot_effects,
    plot_loss_curves,
    plot_metric_by_cell,
)
from harness.report.tables import (
    DEVICE_HOURS_COLUMNS,
    REFERENCE_SOURCES,
    STATUS_ORDER,
    TABLE_FORMATS,
    ReportError,
    axis_baselines,
    cell_table,
    check_metric,
    cost_by_cell,
    finished_values,
    job_table,
    reference_table,
    render_table,
    write_tables,
)
from harness.report.sequential import SequentialState, report_lines as sequential_report
from harness.report.verdicts import headline

__all__ = ["ReportError", "ReportResult", "build_report"]

# Columns shown in report.md (the written tables keep every column).
REPORT_CELL_COLUMNS = ["cell", "n", "mean ± std", "delta_vs_baseline", "status",
                       *DEVICE_HOURS_COLUMNS, "images_per_s"]
REPORT_EFFECT_COLUMNS = ["effect", "levels", "estimate", "ci_low", "ci_high", "p_holm", "verdict",
                         "n_seeds", "mde", "seeds_needed"]
# The effects table's columns, in the order written (every format)
EFFECT_TABLE_COLUMNS = ["effect", "levels", "estimate", "ci_low", "ci_high", "p_value", "p_holm",
                        "verdict", "n_seeds", "mde", "seeds_needed", "se", "df", "order", "method"]
REPORT_REFERENCE_COLUMNS = ["cell", "metric", *REFERENCE_SOURCES, "measured", "n", "delta_vs_paper",
                            "delta_vs_authors_code"]


@dataclass(frozen=True)
class ReportResult:
    """Paths written by `build_report`."""

    report: Path
    tables: tuple[Path, ...]
    figures: tuple[Path, ...]
    effects: pd.DataFrame  # estimate_effects' frame, for the terminal
    headline: str  # the verdicts in words, as at the top of report.md

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.report, *self.tables, *self.figures)


def build_report(
    runs: pd.DataFrame,
    curves: pd.DataFrame | None,
    out_dir: str | Path,
    *,
    metric: str = "linear_top1",
    formats: Iterable[str] = TABLE_FORMATS,
    margin: float | None = None,
    sequential: SequentialState | None = None,
) -> ReportResult:
    """Write tables, figures and report.md for `runs` (and loss `curves`) under out_dir.

    Figures are drawn in forked processes while the tables are written (one per CPU, at most
    one per figure; `MILAN_BENCH_REPORT_WORKERS=1` draws them here, one after the other).
    Drawing is CPU-bound Python, so this is what brings a 1,000-run report under its time
    goal on two cores.

    `margin` (points of `metric`) is the verdicts' equivalence margin: by default the grid's
    (``runs.attrs["margin"]``), else DEFAULT_MARGIN.

    `sequential` is the record of ``ablate --until-resolved``'s looks, when the grid ran so: the
    report then says which sequential design it used, its looks, the alpha spent and why it stopped.

    Raises ReportError when `metric` is not a column with at least one value.
    """
    check_metric(runs, metric)
    out_dir = Path(out_dir)
    formats = tuple(formats)
    margin = margin or runs.attrs.get("margin") or DEFAULT_MARGIN
    fig_dir = out_dir / "figures"
    with _FigureRenderer(_figure_jobs(runs, curves, metric, fig_dir)) as renderer:
        # the statistics run while the workers draw the other figures
        effects = estimate_effects(runs, metric, margin=margin)
        if effects["estimate"].notna().any():
            renderer.add("effects", (plot_effects, (effects, metric, fig_dir / "effects.png")))
        tables = {"effects": effects[EFFECT_TABLE_COLUMNS], "cells": cell_table(runs, metric)}
        reference = reference_table(runs)
        if reference is not None:
            tables["reference"] = reference
        jobs = job_table(runs)
        if jobs is not None:
            tables["jobs"] = jobs
        table_paths = write_tables(tables, out_dir / "tables", formats)
        figure_paths = renderer.results()
    words = headline(effects, runs, metric_label(metric))
    report = out_dir / "report.md"
    report.write_text(
        _render_report(runs, metric, tables, figure_paths, formats, out_dir, words, sequential),
        encoding="utf-8"
    )
    return ReportResult(report, tuple(table_paths), tuple(figure_paths.values()), effects, words)


FigureJob = tuple[Callable[..., Path], tuple]


def _figure_jobs(
    runs: pd.DataFrame,
    curves: pd.DataFrame | None,
    metric: str,
    fig_dir: Path,
) -> dict[str, FigureJob]:
    """Each figure of the runs whose data exists, keyed by the report section that embeds it
    (the forest plot is added once the effects are estimated)."""
    jobs: dict[str, FigureJob] = {}
    if finished_values(runs, metric).notna().any():
        jobs["cells"] = (plot_metric_by_cell, (runs, metric, fig_dir / "metric_by_cell.png"))
    if curves is not None and curves["loss"].notna().any():
        jobs["curves"] = (plot_loss_curves, (curves, fig_dir / "loss_curves.png"))
    if cost_by_cell(runs).notna().any().any():
        jobs["cost"] = (plot_cost, (runs, fig_dir / "cost.png"))
    return jobs


# Figures by drawing time on a 1,000-run grid: cost ~2.0 s, cells ~1.7 s, curves ~1.0 s,
# effects ~0.5 s (CPU seconds, 2-core machine).
SUBMIT_ORDER = ("cost", "cells", "curves", "effects")


def _default_workers() -> int:
    env = os.environ.get("MILAN_BENCH_REPORT_WORKERS", "").strip()
    if env.isdigit():
        return max(1, int(env))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _FigureRenderer:
    """Draws figure jobs in forked worker processes (started on enter) or, with one worker,
    where fork is unavailable or while other threads run, in this process when `results()`
    is called. A failure of the worker pool (not of a figure) falls back to drawing here."""

    def __init__(self, jobs: Mapping[str, FigureJob]) -> None:
        self.jobs = dict(jobs)
        self.workers = min(len(self.jobs) + 1, _default_workers())  # + the forest plot, added later
        self.pool = None
        self.futures: dict[str, Future] = {}

    def __enter__(self) -> _FigureRenderer:
        # fork only a single-threaded process: a lock held by another thread at fork time
        # would stay held in the child forever
        if self.workers > 1 and sys.platform == "linux" and threading.active_count() == 1:
            try:
                self.pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("fork")
                )
                # longest first (measured on 1,000 runs), so two workers finish together
                order = sorted(self.jobs, key=lambda k: SUBMIT_ORDER.index(k) if k in SUBMIT_ORDER else 0)
                self.futures = {key: self.pool.submit(self.jobs[key][0], *self.jobs[key][1])
                                for key in order}
            except (OSError, ValueError):
                self._close()
        return self

    def add(self, key: str, job: FigureJob) -> None:
        """One more figure, drawn by a free worker (the pool forked all of them at its first job)."""
        self.jobs[key] = job
        if self.pool is not None:
            self.futures[key] = self.pool.submit(job[0], *job[1])

    def results(self) -> dict[str, Path]:
        paths = {}
        for key, (fn, args) in self.jobs.items():
            future = self.futures.get(key)
            if future is not None:
                try:
                    paths[key] = future.result()
                    continue
                except BrokenProcessPool:
                    pass  # a worker died (not the figure's fault): draw it here
            paths[key] = fn(*args)
        return paths

    def _close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
            self.futures = {}

    def __exit__(self, *exc: object) -> None:
        self._close()


# --- report.md -----------------------------------------------------------------------


# One "how to read this" line per report section.
HOW_TO_READ: dict[str, str] = {
    "cells": "one row per cell; mean ± std over finished seeds (n); delta_vs_baseline = "
    "cell mean − baseline-cell mean; status lists runs that did not finish and why; cost = "
    "total device-hours (GPU-hours, or CPU core-hours on CPUs) and mean images/s; the reference rows: "
    "random init, the untrained encoder evaluated without pretraining, and teacher, the frozen "
    "teacher's image tower evaluated with the cells' protocols.",
    "effects": "estimate = change in the metric; a main effect (one axis) is the mean change "
    "when the axis moves from its baseline to the value shown, over the other axes' values; an "
    "interaction (a × b) is half the difference of a's effect between b's two values (Box, "
    "Hunter & Hunter's convention); pretrained vs random init is the mean over the grid's cells "
    "minus the untrained encoder; student vs teacher is the mean over the cells that distil the "
    "teacher (CLIP targets) minus the frozen teacher (negative: the students stay below it). ci_low/ci_high: 95% interval; p_holm: p-value adjusted over "
    "all effects (Holm); verdict: resolved ± (p_holm < 0.05), negligible (interval inside ± the "
    "margin; takes precedence), not resolved; mde: the effect resolved with 80% power at the "
    "seeds run; seeds_needed: seeds in all for an effect the size of the margin.",
    "sequential": "the grid ran in rounds of seeds (`ablate --until-resolved`), and these verdicts were "
    "read after every round: each look spends part of alpha (the design line names the spending function), "
    "so a verdict here keeps its error rate however many looks were taken. A cell shows the verdict "
    "after that look (open: none yet) and the estimate; a verdict, once reached, stays.",
    "jobs": "one row per group job: cells of one seed that differ only on the student side trained in one "
    "job, on one data stream with one teacher forward per batch (paired: the same batches, and the same "
    "masks where their mask sampling agrees); device_hours = the sum of its cells' apportioned shares "
    "(each cell: its own student's compute, its share of the teacher and of the data loading).",
    "reference": "published numbers beside the measured cells (MILAN: clip / prompting / semantic; MAE: "
    "pixel / standard / random; the teacher reference): paper = the MILAN paper's abstract for MILAN, the "
    "MAE paper's Table 5 for MAE's ADE20K mIoU, FT-CLIP (arXiv 2212.06138) for the CLIP ViT-B/16 teacher "
    "fine-tuned itself; deltas are measured − that source.",
    "curves": "mean loss over seeds (with a ±sd band for small grids); pixel and CLIP "
    "losses are different quantities, so each target has its own facet and y scale.",
    "cost": "device-hours per cell (GPU-hours on GPUs, CPU core-hours on CPUs: wall time of "
    "pretraining and evaluation x devices) and mean training throughput; the baseline cell is in "
    "red.",
}


def _render_report(
    runs: pd.DataFrame,
    metric: str,
    tables: Mapping[str, pd.DataFrame],
    figures: Mapping[str, Path],
    formats: tuple[str, ...],
    out_dir: Path,
    words: str,
    sequential: SequentialState | None = None,
) -> str:
    embeds = {
        key: f"![{key}]({path.relative_to(out_dir).as_posix()})" for key, path in figures.items()
    }

    def section(title: str, key: str, *body: str) -> list[str]:
        links = " · ".join(f"[{fmt}](tables/{key}.{fmt})" for fmt in formats)
        return [
            f"## {title}",
            f"How to read this: {HOW_TO_READ[key]}",
            *body,
            f"Full table: {links}" if key in tables and links else "",
            embeds.get(key, ""),
        ]

    effects = tables["effects"]
    sections = [
        _header(runs, metric),
        words,
        *section(
            "Effects and verdicts", "effects",
            render_table(_effect_rows(effects), "md") if len(effects) else
            "No effects: no axis has finished runs at two of its values.",
        ),
    ]
    if sequential is not None:
        sections += section("Until resolved: sequential verdicts", "sequential", sequential_report(sequential))
    sections += [
        *section(
            f"{metric_label(metric)} per cell", "cells",
            _baseline_note(runs, tables["cells"]),
            render_table(_cost_digits(_columns(tables["cells"], REPORT_CELL_COLUMNS)), "md"),
        ),
    ]
    if "reference" in tables:
        sections += section(
            "Reference numbers (ViT-B/16, 400 epochs of ImageNet-1K pretraining)", "reference",
            render_table(_columns(tables["reference"], REPORT_REFERENCE_COLUMNS), "md"),
        )
    if "jobs" in tables:
        sections += section("Group jobs", "jobs", render_table(tables["jobs"], "md"))
    if "curves" in figures:
        sections += section("Training loss", "curves")
    if "cost" in figures:
        sections += section("Cost", "cost")
    return "\n\n".join(s.strip() for s in sections if s) + "\n"


def _header(runs: pd.DataFrame, metric: str) -> str:
    grid = runs.attrs.get("grid", "unnamed grid")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = runs["status"].value_counts()
    ordered = [s for s in STATUS_ORDER if s in counts] + sorted(
        set(counts.index) - set(STATUS_ORDER)
    )
    by_status = ", ".join(f"{counts[s]} {s}" for s in ordered)
    return (
        f"# MILAN ablation report: {grid}\n\n"
        f"Generated {date} · metric: `{metric}`, {metric_label(metric)} · "
        f"{runs['cell_id'].nunique()} cells, {len(runs)} runs: {by_status}"
    )


def _baseline_note(runs: pd.DataFrame, cells: pd.DataFrame) -> str:
    """Explain empty deltas instead of leaving the reader to guess."""
    if cells["delta_vs_baseline"].notna().any():
        return ""
    baseline = ", ".join(f"{axis}={value}" for axis, value in axis_baselines(runs).items())
    return f"No finished baseline cell ({baseline}) in this grid, so deltas are empty."


def _effect_rows(effects: pd.DataFrame) -> pd.DataFrame:
    """The effects as report.md shows them: p-values to 2 significant digits (a fixed 2 decimals
    would print a decisive 0.0003 as 0.00)."""
    shown = effects[REPORT_EFFECT_COLUMNS].copy()
    shown["p_holm"] = shown["p_holm"].map(lambda p: "–" if pd.isna(p) else f"{p:.2g}")
    shown["seeds_needed"] = shown["seeds_needed"].astype(object).where(shown["seeds_needed"].notna(), "–")
    return shown


def _cost_digits(table: pd.DataFrame) -> pd.DataFrame:
    """Device-hours to 3 significant digits: a CPU cell's 0.0047 core-hours is not 0.00."""
    columns = [c for c in DEVICE_HOURS_COLUMNS if c in table]
    return table.assign(**{c: table[c].map(lambda h: "–" if pd.isna(h) else f"{h:.3g}") for c in columns})


def _columns(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The listed columns that the table has (cost columns are optional), in order."""
    return table[[c for c in columns if c in table]]

