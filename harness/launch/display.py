"""Text shown by ``ablate`` and ``status``: the dry-run plan, the status table, progress lines."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tabulate import tabulate

from harness.run.cell_state import CellState
from harness.grid import Grid
from harness.launch.cell_views import CellView, log_files, tail
from harness.run.results import HEADLINE_METRICS


def headline(folder: Path) -> str:
    """``linear_top1=12.8`` from a finished run's results.json ('' when there is none)."""
    try:
        metrics = json.loads((folder / "results.json").read_text())["metrics"]
    except (FileNotFoundError, KeyError, ValueError):
        return ""
    key = next((k for k in HEADLINE_METRICS if k in metrics), None)
    return f"{key}={metrics[key]:.4g}" if key else ""


def counts(views: Sequence[CellView]) -> str:
    """``3 done, 2 running, 3 pending`` in a fixed order, and how many wait to sync to MLflow."""
    tally = Counter(v.state for v in views)
    text = ", ".join(f"{tally[state]} {state}" for state in CellState if tally[state])
    if waiting := sum(bool(v.backlog) for v in views):
        text += f"; {waiting} waiting to sync to MLflow"
    return text


def _name(v: CellView) -> str:
    return f"{v.record.name} seed={v.record.seed}" if v.record else v.folder.name


def _hours(value: float | str | None) -> str:
    return "?" if value is None else value if isinstance(value, str) else f"{value:,.1f}"


def _progress(v: CellView) -> str:
    if v.state == CellState.DONE or not v.stage:
        return ""
    return f"{v.stage} {v.step}" if v.step is not None else v.stage


def plan_table(grid: Grid, views: Sequence[CellView], hours: Mapping[str, float | str | None],
               actions: Sequence[str], job_of: Mapping[int, int]) -> str:
    """The dry-run table: one row per cell x seed; ``job_of``: cell index -> the job it would run in."""
    resources = grid.resources.summary()
    rows = [[i, c.name, c.seed, c.run_id, resources, _hours(hours.get(c.run_id)), v.state, action, job_of.get(i, "")]
            for i, (c, v, action) in enumerate(zip(grid.cells, views, actions))]
    table = tabulate(rows, headers=["#", "cell", "seed", "run id", "resources", "GPU-h", "status", "ablate would",
                                    "job"], tablefmt="simple")
    numbers = [h for h in hours.values() if isinstance(h, float)]
    if numbers:
        total = (f"total {sum(numbers):,.1f} GPU-hours of pretraining (evaluation not included), assuming "
                 f"{grid.spec.estimate.sustained_tflops:g} TFLOP/s sustained per GPU on FLOPs counted with torch's "
                 "FlopCounterMode (student forward+backward, teacher forward)")
        if len(numbers) < len(hours):
            total += "; '?': no data tree here and no estimate.train_images in the grid"
    elif any(h == "cpu" for h in hours.values()):
        total = "CPU cells: no GPU-hours"
    else:
        total = "GPU-hours unknown: the data tree is not visible here; set estimate.train_images in the grid"
    return f"{table}\n{len(grid.cells)} cells; {total}"


def _job(v: CellView) -> str:
    """The cell's job, and how many cells it trains together: ``4711_2 (group of 8)``."""
    if not v.job_id:
        return ""
    size = next((s.group_size for s in reversed(v.record.submissions) if s.job_id == v.job_id), 1) if v.record else 1
    return f"{v.job_id} (group of {size})" if size > 1 else v.job_id


def status_table(views: Sequence[CellView]) -> str:
    rows = []
    for v in views:
        detail = headline(v.folder) if v.state == CellState.DONE else (v.reason or "")
        if v.backlog:
            detail = f"{detail}; waiting to sync: {v.backlog}" if detail else f"waiting to sync: {v.backlog}"
        r = v.record
        rows.append([r.name if r else v.folder.name, r.seed if r else "", v.state, _progress(v), v.attempts or "",
                     _job(v), detail[:120]])
    return tabulate(rows, headers=["cell", "seed", "state", "stage", "attempts", "job", "result / reason"],
                    tablefmt="simple")


def failure_details(views: Sequence[CellView], lines: int = 8) -> str:
    """For each failed cell: its reason, log paths and the last lines of its logs."""
    out: list[str] = []
    for v in views:
        if v.state != CellState.FAILED:
            continue
        stage = f" at stage {v.stage}" if v.stage and v.stage != "done" else ""
        out += [f"\nFAILED {_name(v)}{stage}: {v.reason or 'no reason recorded'}", f"  run folder: {v.folder}"]
        for path in log_files(v.record.last if v.record else None):
            out.append(f"  log {path}:")
            out.extend(f"    | {line}" for line in tail(path, lines))
    return "\n".join(out)


def transition(view: CellView) -> str:
    """One progress line for a cell that changed state."""
    extra = headline(view.folder) if view.state == CellState.DONE else (view.reason or "")
    job = f" [{view.job_id}]" if view.job_id and not view.job_id.startswith("queued") else ""
    return f"{time.strftime('%H:%M:%S')} {view.state.value:<9} {_name(view)}{job}{'  ' + extra if extra else ''}"


def rehearsal_verdict(views: Sequence[CellView], grid: str) -> str:
    """The last line of ``ablate --rehearse``: the real run's command, or the first cell and stage that failed."""
    failed = [v for v in views if v.state == CellState.FAILED]
    if not failed:
        return (f"rehearsal passed: all {len(views)} cells ran every stage. Run the grid itself with: "
                f"python bench.py ablate {grid}")
    first = failed[0]
    stage = first.stage if first.stage and first.stage != "done" else "start-up"
    return (f"rehearsal FAILED: {len(failed)} of {len(views)} cells; the first, {_name(first)}, at stage {stage}: "
            f"{first.reason or 'no reason recorded'} (its log lines are above)")
