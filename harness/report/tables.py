"""Comparison tables built from the tidy `runs` frame (one row per grid cell x seed).

Grid metadata comes from `runs.attrs`: ``axes`` (axis columns in grid order),
``axis_baselines`` (axis -> baseline value), ``metrics``, ``grid`` and ``paper_setting``.
Only runs with status "done" contribute metric values: a preempted or running run may
have logged a number, but it is not a finished measurement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from harness.core.errors import UserError
from harness.tracking.schema import CELL_ROLE, TEACHER

DONE = "done"
# Cost columns per run, first present wins: GPU-hours where the runs used GPUs, else CPU core-hours.
DEVICE_HOURS_COLUMNS: tuple[str, ...] = ("gpu_hours", "cpu_core_hours")
# Order in which statuses are listed in summaries: finished first, then the ones that
# need attention, then the ones that will resolve by themselves.
STATUS_ORDER: tuple[str, ...] = ("done", "failed", "preempted", "running", "pending")

# The full MILAN configuration; in a paper-setting grid this is the cell the paper reports.
MILAN_CELL: dict[str, str] = {
    "model.target": "clip",
    "model.decoder": "prompting",
    "model.masking": "semantic",
}
# MAE: pixel target, standard decoder, random masks (the baselines of MILAN's switches).
MAE_CELL: dict[str, str] = {"model.target": "pixel", "model.decoder": "standard", "model.masking": "random"}


@dataclass(frozen=True)
class Reference:
    """Published numbers for one metric of one cell of a paper-setting grid (ViT-B/16, 400 epochs of
    ImageNet-1K pretraining), by source; NaN: not reported."""

    cell: str
    switches: Mapping[str, str]  # the cell's switch values (a grid cell), or {} for a reference run
    metric: str
    values: Mapping[str, float]
    role: str = CELL_ROLE  # the runs frame's role: a grid cell, or the teacher reference

    def runs_of(self, runs: pd.DataFrame) -> pd.Series:
        """Mask of the runs this row compares with."""
        if self.role != CELL_ROLE:
            return runs["role"].eq(self.role) if "role" in runs else pd.Series(False, index=runs.index)
        return cell_mask(runs, self.switches)


PAPER, AUTHORS_CODE, PORT = "paper", "authors' code (OpenMMLab repro)", "OpenMMLab port"
REFERENCE_SOURCES: tuple[str, ...] = (PAPER, AUTHORS_CODE, PORT)
# "paper": the MILAN paper's abstract (Hou et al., arXiv 2208.06049) for the MILAN cell, the MAE paper's
# Table 5 (He et al., arXiv 2111.06377: UperNet on ADE20K) for the MAE cell, FT-CLIP (Dong et al., arXiv
# 2212.06138: CLIP ViT-B/16 itself fine-tuned on ImageNet-1K) for the teacher; the other two sources are
# OpenMMLab's runs of the authors' code and of its own port, as collected in docs/milan-spec.
REFERENCES: tuple[Reference, ...] = (
    Reference("MILAN", MILAN_CELL, "finetune_top1", {PAPER: 85.4, AUTHORS_CODE: 85.2, PORT: 85.3}),
    Reference("MILAN", MILAN_CELL, "linear_top1", {AUTHORS_CODE: 78.9, PORT: 78.9}),
    Reference("MILAN", MILAN_CELL, "seg_upernet_miou", {PAPER: 52.7}),
    Reference("MAE", MAE_CELL, "seg_upernet_miou", {PAPER: 48.1}),
    Reference("CLIP ViT-B/16 (teacher)", {}, "finetune_top1", {PAPER: 85.7}, role=TEACHER),
)

TABLE_FORMATS: tuple[str, ...] = ("md", "csv", "tex", "html")


def parse_formats(text: str) -> tuple[str, ...]:
    """``"md, CSV,.tex"`` -> ("md", "csv", "tex"): a --format value as table formats, in order."""
    formats = tuple(dict.fromkeys(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in TABLE_FORMATS]
    if unknown or not formats:
        raise UserError(f"unknown table format {', '.join(unknown) or repr(text)}: choose from "
                        f"{','.join(TABLE_FORMATS)} (comma-separated)")
    return formats


class ReportError(ValueError):
    """A report cannot be built from the given inputs (message is one line)."""


# --- grid metadata -------------------------------------------------------------------


def grid_axes(runs: pd.DataFrame) -> list[str]:
    """Axis columns in grid order."""
    return list(runs.attrs.get("axes", []))


def axis_baselines(runs: pd.DataFrame) -> dict[str, object]:
    """Baseline value of every axis (KeyError names an axis missing from the attrs)."""
    baselines = runs.attrs.get("axis_baselines", {})
    return {axis: baselines[axis] for axis in grid_axes(runs)}


def axis_levels(runs: pd.DataFrame, axis: str) -> list[object]:
    """Values of one axis: baseline first, then the others in order of appearance."""
    baseline = axis_baselines(runs)[axis]
    return [baseline, *(v for v in runs[axis].dropna().unique() if v != baseline)]


def available_metrics(runs: pd.DataFrame) -> list[str]:
    """Metric columns that hold at least one value."""
    listed = runs.attrs.get("metrics", [])
    return [m for m in listed if m in runs and runs[m].notna().any()]


def check_metric(runs: pd.DataFrame, metric: str) -> None:
    """Raise ReportError unless `metric` is a numeric column with at least one value."""
    if metric in runs and is_numeric_dtype(runs[metric]) and runs[metric].notna().any():
        return
    available = ", ".join(available_metrics(runs)) or "none"
    raise ReportError(
        f"metric {metric!r} has no values in these runs; available metrics: {available}"
    )


def finished_values(runs: pd.DataFrame, metric: str) -> pd.Series:
    """The metric where the run finished, NaN elsewhere (keeps the runs index)."""
    return runs[metric].where(runs["status"] == DONE)


# --- cell-level tables ---------------------------------------------------------------


def ordered_cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell: cell_id, axis values, cell name and `is_baseline`.

    Rows are sorted axis by axis (grid order) with each axis's baseline value first, so
    the baseline cell, when the grid has one, is the first row; the random-init reference
    (no axis values) comes last.
    """
    axes = grid_axes(runs)
    cells = runs.drop_duplicates("cell_id")[["cell_id", *axes, "cell"]]
    levels = {axis: axis_levels(runs, axis) for axis in axes}
    if axes:
        # missing values (the reference row) sort last, not as code -1
        cells = cells.sort_values(
            axes, kind="stable",
            key=lambda s: pd.Series(pd.Categorical(s, levels[s.name]).codes, s.index).replace(-1, len(levels[s.name])),
        )
    baseline = pd.Series(axis_baselines(runs), dtype=object)
    is_baseline = cells[axes].eq(baseline).all(axis=1) if axes else True
    if "role" in runs:
        is_baseline &= cells["cell_id"].map(runs.groupby("cell_id")["role"].first()).eq(CELL_ROLE)
    return cells.assign(is_baseline=is_baseline).reset_index(drop=True)


def device_hours(runs: pd.DataFrame) -> pd.Series | None:
    """Per run, what it cost in the unit the grid ran on (the series' name: ``gpu_hours`` when any
    run used GPUs, else ``cpu_core_hours``); None when no run reports a cost."""
    for column in DEVICE_HOURS_COLUMNS:
        if column in runs and runs[column].notna().any():
            return runs[column]
    return None


def cost_by_cell(runs: pd.DataFrame) -> pd.DataFrame:
    """Cost per cell_id: total device-hours (:func:`device_hours`: ``gpu_hours`` or
    ``cpu_core_hours``, all runs that report one), mean images/s.

    Each cost column is optional in the runs contract, so only present ones are returned.
    """
    grouped = runs.groupby("cell_id", sort=False)
    cost = {}
    if (hours := device_hours(runs)) is not None:
        cost[hours.name] = hours.groupby(runs["cell_id"], sort=False).sum(min_count=1)
    if "images_per_s" in runs:
        cost["images_per_s"] = grouped["images_per_s"].mean()
    return pd.DataFrame(cost, index=pd.Index(runs["cell_id"].unique(), name="cell_id"))


JOB_TABLE_COLUMNS = ["job", "seed", "cells", "names", "device_hours"]


def job_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """One row per group job (a job that trained several cells on one data stream and one teacher
    forward): its seed, how many cells, which, and what it cost (its cells' apportioned hours
    summed). None when every run trained alone."""
    if "group_size" not in runs or "job" not in runs:
        return None
    grouped = runs[runs["group_size"].gt(1) & runs["job"].notna()]
    if grouped.empty:
        return None
    hours = device_hours(grouped)
    table = grouped.groupby("job", sort=False).agg(
        seed=("seed", "first"), cells=("cell", "size"), names=("cell", lambda c: "; ".join(c)))
    table["device_hours"] = hours.groupby(grouped["job"], sort=False).sum(min_count=1) if hours is not None else np.nan
    return table.reset_index()[JOB_TABLE_COLUMNS]


def format_mean_std(mean: pd.Series, std: pd.Series, digits: int = 2) -> pd.Series:
    """'mean ± std'; just the mean when std is undefined (one seed); '–' with no value."""
    fmt = f"{{:.{digits}f}}".format
    # "str" dtype even when everything is missing, so the concatenation stays textual.
    mean_text = mean.map(fmt, na_action="ignore").astype("str")
    std_text = std.map(fmt, na_action="ignore").astype("str")
    return (mean_text + " ± " + std_text).fillna(mean_text).fillna("–")


def _status_rank(status: str) -> int:
    return STATUS_ORDER.index(status) if status in STATUS_ORDER else len(STATUS_ORDER)


def status_by_cell(runs: pd.DataFrame) -> pd.Series:
    """Status summary per cell_id, e.g. '2/3 done, 1 failed: CUDA out of memory'.

    Built one status at a time (a handful), vectorised over cells.
    """
    counts = runs.groupby(["cell_id", "status"]).size().unstack(fill_value=0)
    reasons = (
        runs.dropna(subset=["failure_reason"])
        .astype({"failure_reason": str})
        .drop_duplicates(["cell_id", "status", "failure_reason"])
        .groupby(["cell_id", "status"])["failure_reason"]
        .agg("; ".join)
        .unstack()
        .reindex(index=counts.index, columns=counts.columns)
        .astype("string")  # statuses without any reason are all-NA: keep them text
    )
    done = counts[DONE] if DONE in counts else pd.Series(0, index=counts.index)
    summary = done.astype(str) + "/" + counts.sum(axis=1).astype(str) + " done"
    for status in sorted(counts.columns.drop(DONE, errors="ignore"), key=_status_rank):
        part = counts[status].astype(str) + " " + status + (": " + reasons[status]).fillna("")
        summary += (", " + part).where(counts[status] > 0, "")
    return summary


def cell_table(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per cell: axes, n finished seeds, mean/std, delta vs baseline, status, cost.

    Every cell appears, including those with no finished run (n = 0, NaN mean). The
    delta is NaN when the grid has no baseline cell or the baseline has no value.
    """
    check_metric(runs, metric)
    stats = (
        finished_values(runs, metric)
        .groupby(runs["cell_id"], sort=False)
        .agg(["count", "mean", "std"])
        .rename(columns={"count": "n"})
    )
    cost = cost_by_cell(runs)
    cells = ordered_cells(runs).join(stats, on="cell_id").join(cost, on="cell_id")
    baseline_mean = cells.loc[cells["is_baseline"], "mean"]
    table = cells.assign(
        **{"mean ± std": format_mean_std(cells["mean"], cells["std"])},
        delta_vs_baseline=cells["mean"] - baseline_mean.iloc[0] if len(baseline_mean) else np.nan,
        status=cells["cell_id"].map(status_by_cell(runs)),
    )[[*grid_axes(runs), "cell", "n", "mean", "std", "mean ± std", "delta_vs_baseline",
       "status", *cost.columns, "cell_id"]]
    table.attrs = {"metric": metric}
    return table


# --- reference numbers ---------------------------------------------------------------


def cell_mask(runs: pd.DataFrame, switches: Mapping[str, str]) -> pd.Series:
    """Runs of the cell with these switch values and every other axis at its baseline."""
    wanted = {**axis_baselines(runs), **switches}
    wanted = {col: value for col, value in wanted.items() if col in runs}
    return runs[list(wanted)].eq(pd.Series(wanted, dtype=object)).all(axis=1)


def milan_cell_mask(runs: pd.DataFrame) -> pd.Series:
    """Runs of the MILAN cell: clip/prompting/semantic, every other axis at baseline."""
    return cell_mask(runs, MILAN_CELL)


def reference_table(runs: pd.DataFrame) -> pd.DataFrame | None:
    """Published numbers beside the measured cells, one row per (cell, metric) the runs measure;
    None outside the paper setting."""
    if not runs.attrs.get("paper_setting", False):
        return None
    rows = []
    for ref in REFERENCES:
        if ref.metric not in runs or runs[ref.metric].isna().all():  # a metric this grid does not measure
            continue
        if ref.role != CELL_ROLE and not ref.runs_of(runs).any():  # a grid without that reference run
            continue
        measured = runs.loc[ref.runs_of(runs) & (runs["status"] == DONE), ref.metric].dropna()
        rows.append({"cell": ref.cell, "metric": ref.metric,
                     **{source: ref.values.get(source, np.nan) for source in REFERENCE_SOURCES},
                     "measured_mean": measured.mean(), "measured_std": measured.std(), "n": len(measured)})
    if not rows:
        return None
    table = pd.DataFrame(rows)
    return table.assign(measured=format_mean_std(table["measured_mean"], table["measured_std"]),
                        delta_vs_paper=table["measured_mean"] - table[PAPER],
                        delta_vs_authors_code=table["measured_mean"] - table[AUTHORS_CODE])


# --- writers -------------------------------------------------------------------------


def write_tables(
    tables: Mapping[str, pd.DataFrame],
    out_dir: str | Path,
    formats: Iterable[str] = TABLE_FORMATS,
) -> list[Path]:
    """Write each table as `<out_dir>/<name>.<fmt>`; returns the written paths."""
    formats = tuple(formats)
    unknown = sorted(set(formats) - set(TABLE_FORMATS))
    if unknown:
        raise ReportError(f"unknown table formats {unknown}; known: {list(TABLE_FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        for fmt in formats:
            path = out_dir / f"{name}.{fmt}"
            path.write_text(render_table(table, fmt), encoding="utf-8")
            written.append(path)
    return written


def render_table(table: pd.DataFrame, fmt: str) -> str:
    """Text of one table in one format; floats with 2 decimals except in CSV."""
    if fmt == "csv":  # full precision: CSV is for machines
        return table.to_csv(index=False)
    if fmt == "md":
        # tabulate only treats None as missing, so NaN would print as "nan".
        cleaned = table.astype(object).where(table.notna(), None)
        # text columns stay as written (tabulate would reformat "1.4e-05" as 0.00)
        # (tabulate sizes this list by the data rows: an empty table takes none)
        text = [i for i, column in enumerate(table.columns) if not is_numeric_dtype(table[column])]
        numparse = {"disable_numparse": text} if len(table) and text else {}
        return cleaned.to_markdown(index=False, floatfmt=".2f", missingval="–", **numparse) + "\n"
    if fmt == "tex":
        # escape=True: axis names and metrics contain "_" which LaTeX would reject.
        return table.to_latex(index=False, float_format="%.2f", na_rep="--", escape=True)
    return table.to_html(index=False, float_format="{:.2f}".format, na_rep="–")
