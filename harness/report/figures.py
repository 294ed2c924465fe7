"""Report figures: seaborn objects plots rendered with Agg, saved as PNG.

Figures are plain `matplotlib.figure.Figure` objects with an Agg canvas, never created
through pyplot: they stay out of pyplot's global registry (so there is nothing left open
to close and no GUI backend is ever selected) and are freed when the function returns.
Every function saves one PNG and returns its path.
"""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn.objects as so
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text

from harness.report.effects import RESOLVED_DOWN, RESOLVED_UP, VERDICTS
from harness.run.results import METRICS
from harness.report.tables import (
    check_metric,
    cost_by_cell,
    finished_values,
    grid_axes,
    ordered_cells,
)

DPI = 120
# zlib level of the PNGs: 1 instead of Pillow's 6 encodes a 125-cell figure several times
# faster, for files about 30% larger (measured with `bench.py report-bench`)
PNG_COMPRESS_LEVEL = 1
ROW_HEIGHT_IN = 0.22  # per category row on horizontal plots: keeps tick labels apart
X_AXIS_HEIGHT_IN = 0.6  # tick labels and label of a row figure's x axis
COLUMN_GAP = "  "  # between axis-value columns of the row labels
MONO_CHAR_IN = 0.07  # width of one 8 pt monospace character, inches (DejaVu Sans Mono: 0.6 em)
TITLE_CHARS = 70  # wrap width of title lines: fits the narrowest (8 in) figure
ROLE_COLORS = {"baseline": "#c44e52", "other": "#4c72b0"}
# Above this many cells a per-cell legend is unreadable; the lines stay, the legend goes.
MAX_LEGEND_CELLS = 12

# Facet title and x label (with unit) per cost column.
COST_LABELS: dict[str, tuple[str, str]] = {
    "gpu_hours": ("total compute, all runs", "GPU-hours (wall time x GPUs)"),
    "cpu_core_hours": ("total compute, all runs", "CPU core-hours (wall time x cores)"),
    "images_per_s": ("training throughput, mean over runs", "images/s"),
}
# Pixel and CLIP losses are different quantities; the facets say which one is shown.
LOSS_LABELS: dict[str, str] = {
    "pixel": "loss (MSE on masked patches)",
    "clip": "loss (2 − 2·cos to CLIP features)",
}


def metric_label(metric: str) -> str:
    """Axis label with unit for a metric column (the column name when unknown)."""
    return METRICS[metric].label if metric in METRICS else metric


def _figure(width_in: float, height_in: float, *, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _fit_row_margins(fig: Figure, title: Text) -> None:
    """Margins of a one-row-per-cell figure, from two measured texts: the widest row label
    and the title.

    Constrained layout measures every tick label of every facet several times; on a
    125-cell grid that was half the figure's drawing time. Rows share one monospace
    label column, so the longest label is the widest, and one measurement places it.
    """
    renderer = fig.canvas.get_renderer()
    first = fig.axes[0]
    widest = max(first.get_yticklabels(), key=lambda label: len(label.get_text()))
    facet_title_px = max(ax.title.get_window_extent(renderer).height for ax in fig.axes)
    pad_px = 0.15 * DPI
    left_px = widest.get_window_extent(renderer).width + 2 * pad_px
    top_px = title.get_window_extent(renderer).height + facet_title_px + 3 * pad_px
    bottom_px = X_AXIS_HEIGHT_IN * DPI
    width_px, height_px = fig.bbox.width, fig.bbox.height
    title.set_y(1 - pad_px / height_px)  # suptitle's default y is a fraction: too low when tall
    fig.subplots_adjust(
        left=left_px / width_px, right=1 - pad_px / width_px,
        top=1 - top_px / height_px, bottom=bottom_px / height_px, wspace=0.08,
    )


def _draw(plot: so.Plot, fig: Figure) -> None:
    """Render a seaborn objects plot onto `fig`."""
    with warnings.catch_warnings():
        # seaborn 0.13 passes `copy=` to pandas 3 constructors: harmless, and not ours.
        warnings.filterwarnings(
            "ignore", message="The copy keyword is deprecated", module="seaborn"
        )
        plot.on(fig).plot()


def _rows_height(n_rows: int) -> float:
    return 1.8 + ROW_HEIGHT_IN * n_rows


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Seaborn puts its figure legend outside the axes, which only bbox_inches="tight"
    # keeps; it costs a second full draw, so it is used only when there is a legend
    # (the layout already fits labels and titles).
    engine = fig.get_layout_engine()
    if engine is not None and not fig.legends:
        # savefig would draw the whole figure once only to run the layout: run it alone
        engine.execute(fig)
        fig.set_layout_engine("none")
    fig.savefig(path, dpi=DPI, bbox_inches="tight" if fig.legends else None,
                pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL})
    return path


# --- one row per cell ----------------------------------------------------------------


def _cell_rows(runs: pd.DataFrame) -> pd.DataFrame:
    """ordered_cells (baseline first) plus a row `label` and a `role` for colouring."""
    cells = ordered_cells(runs)
    return cells.assign(
        label=_row_labels(cells, grid_axes(runs)),
        role=cells["is_baseline"].map({True: "baseline", False: "other"}),
    )


def _row_labels(cells: pd.DataFrame, axes: list[str]) -> pd.Series:
    """Pivot-table style labels: a fixed-width column per axis, values repeated from
    the row above left blank.

    Rows are sorted axis by axis, so blanking the repeated leading values reads as a
    hierarchy; it also draws a few characters per row instead of every axis value,
    which matters because text dominates the drawing time of large grids. Meant for a
    monospace font, right-aligned (as y tick labels are): the last column is
    right-justified so no label ends in spaces and the columns line up.
    """
    if not axes:
        return cells["cell"]
    reference = cells[axes].isna().all(axis=1)  # the random-init row: labelled by its name
    if reference.all():
        return cells["cell"]
    labels = _axis_labels(cells[~reference], axes)
    return pd.concat([labels, cells.loc[reference, "cell"]]).reindex(cells.index)


def _axis_labels(cells: pd.DataFrame, axes: list[str]) -> pd.Series:
    text = cells[axes].astype(str)
    widths = text.apply(lambda col: col.str.len().max())
    padded = text.apply(lambda col: col.str.ljust(widths[col.name]))
    padded[axes[-1]] = text[axes[-1]].str.rjust(widths[axes[-1]])
    full = padded.agg(COLUMN_GAP.join, axis=1)
    column_start = np.r_[0, np.cumsum(widths.to_numpy() + len(COLUMN_GAP))[:-1]]
    first_new = text.ne(text.shift()).to_numpy().argmax(axis=1)  # first changed column
    return pd.Series(
        [label[column_start[k]:] for label, k in zip(full, first_new)], index=cells.index
    )


def _rows_key(runs: pd.DataFrame) -> str:
    """Names the axes whose values make up the row labels, for the figure title
    (wrapped: a five-axis grid's key is wider than the figure)."""
    return textwrap.fill("rows: " + (" · ".join(grid_axes(runs)) or "cell"), TITLE_CHARS)


def _set_row_labels(ax: Axes, cells: pd.DataFrame) -> None:
    """Replace the cell_id ticks seaborn drew with the row labels; baseline in red.

    Rows are plotted by cell_id because the blanked labels are not unique.
    """
    ax.set_yticks(range(len(cells)), cells["label"], fontfamily="monospace")
    for position in np.flatnonzero(cells["is_baseline"]):
        ax.get_yticklabels()[position].set_color(ROLE_COLORS["baseline"])


def plot_metric_by_cell(runs: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Mean ± sd over seeds per cell, seeds as faint dots, baseline first and in red.

    Cells missing seeds get a hollow mean marker; cells without a finished run keep an
    empty row, so failures stay visible.
    """
    check_metric(runs, metric)
    values = finished_values(runs, metric)
    # Aggregated with pandas, not seaborn's Est: same numbers as the tables, and faster.
    stats = values.groupby(runs["cell_id"]).agg(["mean", "std", "count"])
    cells = _cell_rows(runs).join(stats, on="cell_id")
    cells = cells.assign(
        complete=cells["count"] == cells["count"].max(),
        lo=cells["mean"] - cells["std"],
        hi=cells["mean"] + cells["std"],
    )
    seeds = runs.assign(value=values).dropna(subset=["value"])[["cell_id", "value"]].merge(
        cells[["cell_id", "role"]], on="cell_id"
    )
    fig = _figure(8, _rows_height(len(cells)), layout=None)
    _draw(
        so.Plot(cells, y="cell_id", color="role")
        # Layer data is aligned to the plot data by index unless y/color are repeated.
        .add(so.Dots(pointsize=4, alpha=0.5), data=seeds, x="value", y="cell_id",
             color="role", legend=False)
        .add(so.Range(linewidth=2), x="mean", xmin="lo", xmax="hi", legend=False)
        .add(so.Dot(pointsize=7, edgewidth=1.5), x="mean", fill="complete", legend=False)
        .scale(y=so.Nominal(order=list(cells["cell_id"])), color=ROLE_COLORS,
               fill={True: True, False: False})
        .label(x=metric_label(metric), y=""),
        fig,
    )
    ax = fig.axes[0]
    _set_row_labels(ax, cells)
    baseline_mean = cells.loc[cells["is_baseline"], "mean"]
    if baseline_mean.notna().any():  # how far each cell is from the baseline, at a glance
        ax.axvline(baseline_mean.iloc[0], color=ROLE_COLORS["baseline"], lw=1, ls="--")
    title = fig.suptitle(
        f"{metric_label(metric)} per cell: mean ± sd over seeds\n"
        "small dots: seeds · hollow: missing seeds · red: baseline and its mean\n"
        + _rows_key(runs)
    )
    _fit_row_margins(fig, title)
    return _save(fig, path)


def plot_cost(runs: pd.DataFrame, path: str | Path) -> Path:
    """Total device-hours (GPU-hours, or CPU core-hours on CPUs) and mean throughput per cell,
    side by side, baseline in red."""
    cost = cost_by_cell(runs)
    quantities = list(cost.columns)
    cells = _cell_rows(runs)
    data = cells.join(cost, on="cell_id").melt(
        id_vars=["cell_id", "role"], value_vars=quantities, var_name="quantity",
        value_name="value",
    )
    fig = _figure(3 + 3.5 * len(quantities), _rows_height(len(cells)), layout=None)
    _draw(
        so.Plot(data, x="value", y="cell_id", color="role")
        .add(so.Bars(), legend=False)  # Bars: one patch collection, fast with many cells
        .facet(col="quantity", order=quantities)
        .share(x=False)
        .scale(y=so.Nominal(order=list(cells["cell_id"])), color=ROLE_COLORS)
        .label(y=""),
        fig,
    )
    _set_row_labels(fig.axes[0], cells)  # the facets share rows; only the first has labels
    for ax, quantity in zip(fig.axes, quantities):
        title, unit = COST_LABELS[quantity]
        ax.set(title=title, xlabel=unit)
    title = fig.suptitle(f"Cost per cell (baseline cell in red)\n{_rows_key(runs)}")
    _fit_row_margins(fig, title)
    return _save(fig, path)


# --- other figures -------------------------------------------------------------------

# A forest plot shows every effect up to this many; beyond, interactions of three or more axes
# only where resolved (the table has them all).
MAX_FOREST_ROWS = 40
# Forest-plot colour of each verdict: resolved effects stand out, open ones stay muted.
VERDICT_COLORS: dict[str, str] = dict(zip(VERDICTS, ("#2a9d3f", "#d1495b", "#8c8c8c", "#4c72b0", "#c7c7c7")))


def plot_effects(effects: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Forest plot of an `estimate_effects` frame: one row per effect, its estimate as a dot and
    its 95% interval as a line (none where it has none), coloured by verdict; zero as a dashed
    line and the equivalence margin as a grey band."""
    margin = effects.attrs.get("margin")
    rows = effects.reset_index(drop=True)
    hidden = 0
    if len(rows) > MAX_FOREST_ROWS:  # unreadable, and slow to draw: higher orders stay in the table
        shown = (rows["order"] <= 2) | rows["verdict"].isin([RESOLVED_UP, RESOLVED_DOWN])
        rows, hidden = rows[shown].reset_index(drop=True), int((~shown).sum())
    labels = [f"{effect}: {levels}" for effect, levels in zip(rows["effect"], rows["levels"])]
    # margins from the measured widest label, as the row figures do: constrained layout took
    # 2 s on a 124-effect grid
    longest = max(map(len, labels), default=0)
    fig = _figure(max(8.0, 4.5 + MONO_CHAR_IN * longest), _rows_height(len(rows)), layout=None)
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]  # the first effect at the top
    colors = rows["verdict"].map(VERDICT_COLORS).fillna("black")
    if margin:
        ax.axvspan(-margin, margin, color=".92", zorder=0)
    ax.axvline(0, color=".25", lw=1, ls="--", zorder=1)
    ax.hlines(y, rows["ci_low"], rows["ci_high"], colors=colors, lw=2, zorder=2)
    ax.scatter(rows["estimate"], y, c=colors, s=36, zorder=3)
    ax.set_yticks(y, labels, fontsize=8, fontfamily="monospace")
    ax.set_xlabel(f"effect on {metric_label(metric)}")
    present = [v for v in VERDICTS if v in set(rows["verdict"])]
    ax.legend([Line2D([], [], color=VERDICT_COLORS[v], marker="o", lw=2) for v in present], present,
              loc="best", fontsize=8, title="verdict", title_fontsize=8)
    band = f"; grey band: ±{margin:g} (negligible)" if margin else ""
    if hidden:
        band += f"\n{hidden} interactions of 3+ axes, none resolved, are not drawn: see tables/effects"
    level = 100 * (1 - effects.attrs.get("alpha", 0.05))
    title = fig.suptitle(f"Effects on {metric}: estimate and {level:g}% interval{band}\n"
                         f"{effects.attrs.get('method', '')}", fontsize=10)
    _fit_row_margins(fig, title)
    return _save(fig, path)


def plot_loss_curves(curves: pd.DataFrame, path: str | Path) -> Path:
    """Training loss per cell, mean over seeds, one facet per target type.

    Pixel and CLIP losses live on different scales, so each facet has its own y axis.
    Up to MAX_LEGEND_CELLS cells, each cell has its own colour, a ±sd band and a legend
    entry; beyond that, bands and colours would only blur together, so cells are drawn
    as thin lines of one colour (which also keeps large grids fast to draw).
    Curves are aggregated with pandas first: seaborn would otherwise estimate every
    (cell, step) group itself, which is slow on thousands of runs.
    """
    agg = (
        curves.dropna(subset=["loss"])
        .groupby(["target", "cell", "step"], sort=False)["loss"]
        .agg(["mean", "std"])
        .reset_index()
    )
    spread = agg["std"].fillna(0)  # a single seed has no spread: the band collapses
    agg = agg.assign(lo=agg["mean"] - spread, hi=agg["mean"] + spread)
    known = list(LOSS_LABELS)  # pixel (the baseline target) first, then clip
    targets = sorted(
        agg["target"].unique(), key=lambda t: (known.index(t) if t in known else len(known), t)
    )
    n_cells = agg["cell"].nunique()
    per_cell = n_cells <= MAX_LEGEND_CELLS
    plot = (
        so.Plot(agg, x="step", y="mean")
        .facet(col="target", order=targets)
        .share(y=False)
        .label(x="training step", col="target =", color="cell")
    )
    # so.Lines draws all cells as one collection: much faster than so.Line per cell.
    if per_cell:
        plot = (
            plot.add(so.Band(alpha=0.2), color="cell", ymin="lo", ymax="hi")
            .add(so.Lines(linewidth=1.5), color="cell")
        )
        title = "Training loss: mean over seeds, band ± sd"
    else:
        plot = plot.add(so.Lines(linewidth=0.8, alpha=0.5), group="cell")
        title = f"Training loss: mean over seeds, one line per cell ({n_cells} cells)"
    fig = _figure(5 * len(targets) + (4 if per_cell else 0), 4.5)
    _draw(plot, fig)
    for ax, target in zip(fig.axes, targets):
        # Each facet has its own scale and quantity, so each gets its own y label
        # (seaborn shows one only on the first facet).
        ax.set_ylabel(LOSS_LABELS.get(target, "loss"), visible=True)
    fig.suptitle(title)
    return _save(fig, path)
