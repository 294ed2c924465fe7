"""Comparison tables, figures and a Markdown report from a tidy frame of grid runs.

Input contract (produced by the MLflow reader): `runs` has one row per grid cell x seed
with `cell_id`, `cell`, `seed`, `status`, `failure_reason`, `role` (`random_init` for the
untrained-encoder reference), one column per axis and one per metric, and grid metadata in
`runs.attrs` (`axes`, `axis_baselines`, `metrics`, `grid`, `paper_setting`, `margin`,
`grid_file`); `curves` is long-form training loss (`cell_id`, `cell`, `seed`,
`target`, `step`, `loss`).

Entry point: `build_report(runs, curves, out_dir)`; the table and figure functions are
usable on their own.
"""

from harness.report.build import ReportResult, build_report
from harness.report.effects import estimate_effects
from harness.report.figures import (
    plot_cost,
    plot_loss_curves,
    plot_effects,
    plot_metric_by_cell,
)
from harness.report.tables import (
    REFERENCES,
    REFERENCE_SOURCES,
    ReportError,
    cell_table,
    reference_table,
    write_tables,
)

__all__ = [
    "REFERENCES",
    "REFERENCE_SOURCES",
    "ReportError",
    "ReportResult",
    "build_report",
    "cell_table",
    "estimate_effects",
    "plot_cost",
    "plot_loss_curves",
    "plot_effects",
    "plot_metric_by_cell",
    "reference_table",
    "write_tables",
]
