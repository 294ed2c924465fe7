"""Text shown by ``ablate`` and ``status``: the dry-run plan, the status table, progress lines."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tabulate import tabulate

from harness.grid import Grid
from harness.launch.state import STATES, CellState, CellView, log_files, tail

# Result shown for a finished cell, first one present.
HEADLINE_METRICS = ("linear_top1", "finetune_top1", "knn_top1", "final_loss")


def headline(folder: Path) -> str:
    """``linear_top1=12.8`` from a finished run's results.json ('' when there is none)."""
    try:
        metrics = json.loads((folder / "results.json").read_text())["metrics"]
    except (FileNotFoundError, KeyError, ValueError):
        return ""
    key = next((k for k in HEADLINE_METRICS if k in metrics), None)
    return f"{key}={metrics[key]:.4g}" if key else ""


def counts(states: Sequence[CellState]) -> str:
    """``3 done, 2 running, 3 pending`` in a fixed order."""
    tally = Counter(s.state for s in states)
    return ", ".join(f"{tally[name]} {name}" for name in STATES if tally[name])


def _hours(value: float | str | None) -> str:
    if value is None:
        return "?"
    return value if isinstance(value, str) else f"{value:,.1f}"


def plan_table(grid: Grid, views: Sequence[CellView], hours: Mapping[str, float | str | None],
               actions: Sequence[str]) -> str:
    """The dry-run table: one row per cell x seed."""
    resources = grid.resources.summary()
    rows = [[i, c.name, c.seed, c.run_id, resources, _hours(hours.get(c.run_id)), v.state.state, action]
            for i, (c, v, action) in enumerate(zip(grid.cells, views, actions))]
    table = tabulate(rows, headers=["#", "cell", "seed", "run id", "resources", "GPU-h", "status", "ablate would"],
                     tablefmt="simple")
    numbers = [h for h in hours.values() if isinstance(h, float)]
    est = grid.spec.estimate
    if numbers:
        total = (f"total {sum(numbers):,.1f} GPU-hours of pretraining (evaluation not included), assuming "
                 f"{est.sustained_tflops:g} TFLOP/s sustained per GPU on FLOPs counted with torch's "
                 "FlopCounterMode (student forward+backward, teacher forward)")
        if len(numbers) < len(hours):
            total += "; '?': no data tree here and no estimate.train_images in the grid"
    elif any(h == "cpu" for h in hours.values()):
        total = "CPU cells: no GPU-hours"
    else:
        total = "GPU-hours unknown: the data tree is not visible here; set estimate.train_images in the grid"
    return f"{table}\n{len(grid.cells)} cells; {total}"


def status_table(views: Sequence[CellView]) -> str:
    rows = []
    for v in views:
        r, s = v.record, v.state
        detail = headline(v.folder) if s.state == "done" else (s.reason or "")
        rows.append([r.name if r else v.folder.name, r.seed if r else "", s.state, s.attempts or "",
                     s.job_id or "", detail[:100]])
    return tabulate(rows, headers=["cell", "seed", "state", "attempts", "job", "result / reason"],
                    tablefmt="simple")


def failure_details(views: Sequence[CellView], lines: int = 8) -> str:
    """For each failed cell: its reason, log paths and the last lines of its logs."""
    out: list[str] = []
    for v in views:
        if v.state.state != "failed":
            continue
        name = v.record.name if v.record else v.folder.name
        seed = f" seed={v.record.seed}" if v.record else ""
        out.append(f"\nFAILED {name}{seed}: {v.state.reason or 'no reason recorded'}")
        out.append(f"  run folder: {v.folder}")
        for path in log_files(v.record.last if v.record else None):
            out.append(f"  log {path}:")
            out.extend(f"    | {line}" for line in tail(path, lines))
    return "\n".join(out)


def transition(view: CellView) -> str:
    """One progress line for a cell that changed state."""
    r, s = view.record, view.state
    name = f"{r.name} seed={r.seed}" if r else view.folder.name
    extra = headline(view.folder) if s.state == "done" else (s.reason or "")
    job = f" [{s.job_id}]" if s.job_id and not s.job_id.startswith("queued") else ""
    return f"{time.strftime('%H:%M:%S')} {s.state:<9} {name}{job}{'  ' + extra if extra else ''}"
