"""Benchmark: what group jobs save, and what pairing buys (``bench.py share-bench``).

Three runs of the smoke grid's 8 cells on this machine, through ``ablate`` with the local
executor, each in its own runs folder and SQLite store under ``--out``:

1. shared: the grid as ``ablate`` runs it by default, one group job per seed;
2. unshared: the same seeds with ``--no-share``, one job per cell;
3. independent: every cell with seeds of its own (no two cells share a seed), one job per cell.

From these it prints: wall time and CPU-seconds (this process and its jobs) of 1 and 2; images
decoded and teacher forwards, summed from the runs' own counts (``images_loaded``,
``teacher_images``); the largest difference of a cell's metrics between 1 and 2 (the same
computation: it should be 0); and the width of the main effects' 95% intervals, and the seeds a
margin-sized effect needs, with paired cells (1) and independent ones (3), through the report's
own ``estimate_effects``. Lastly the paper grid's training FLOPs per image, shared and not, from
the dry run's FlopCounterMode count. Everything printed is measured here; nothing is assumed.
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from harness.grid import MILAN_BASELINES, RANDOM_INIT_NAME, find_grid_file, load_grid
from harness.launch.ablate import AblateRequest, ablate
from harness.launch.estimate import sharing_saving
from harness.launch.plan import job_groups
from harness.launch.records import GRID_FILE, LAUNCH_FILE
from harness.report.effects import estimate_effects
from harness.run.folder import RESULTS_FILE
from harness.tracking import DB_NAME, sqlite_uri

GRID = "smoke"
METRIC = "linear_top1"
COMPARED = ("final_loss", "linear_top1", "knn_top1")
MAIN_EFFECTS = ("target", "decoder", "masking")


@dataclass(frozen=True)
class GridRun:
    """One ``ablate`` of the benchmark: what it cost and what its runs measured."""

    label: str
    wall_s: float
    cpu_s: float
    runs: pd.DataFrame  # one row per run: cell, seed, axes, role, metrics, counts


def _cpu_seconds() -> float:
    own, jobs = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + jobs.ru_utime + jobs.ru_stime


def _ablate(label: str, grid: str, out: Path, *, seeds: int | None, share: bool) -> GridRun:
    runs_dir = out / label / "runs"
    request = AblateRequest(grid=grid, seeds=seeds, executor="local", share=share, runs_dir=runs_dir,
                            tracking_uri=sqlite_uri(out / label / DB_NAME))
    wall, cpu = time.perf_counter(), _cpu_seconds()
    outcome = ablate(request, echo=lambda line: None)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    if not outcome.ok:
        raise RuntimeError(f"{label}: a run failed; see {runs_dir}")
    return GridRun(label, wall, cpu, _runs(runs_dir / outcome.grid.name))


def _runs(gdir: Path) -> pd.DataFrame:
    rows = []
    for folder in json.loads((gdir / GRID_FILE).read_text())["folders"]:
        launch = json.loads((gdir / folder / LAUNCH_FILE).read_text())
        metrics = json.loads((gdir / folder / RESULTS_FILE).read_text())["metrics"]
        role = "random_init" if launch["name"] == RANDOM_INIT_NAME else "cell"
        rows.append({"cell": launch["name"], "seed": launch["seed"], "role": role, "status": "done",
                     **{k: v for k, v in launch["axes"].items()}, **metrics})
    return pd.DataFrame(rows)


def _independent(out: Path, seeds: int, cells: pd.DataFrame) -> GridRun:
    """Every cell of the smoke grid as a grid of its own, with seeds no other cell uses."""
    base = find_grid_file(GRID).absolute()
    spec = yaml.safe_load(base.read_text())
    wall = cpu = 0.0
    frames = []
    for index, (_, cell) in enumerate(cells.iterrows()):
        axes = {name: cell[name] for name in MILAN_BASELINES}
        path = out / "independent" / f"cell{index}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({
            "name": f"independent-{index}", "base_config": str((base.parent / spec["base_config"]).absolute()),
            "base": axes, "seeds": [1000 * (index + 1) + r for r in range(seeds)], "random_init": False,
            "resources": spec.get("resources", {})}))
        run = _ablate(f"independent/{index}", str(path), out, seeds=None, share=False)
        wall, cpu = wall + run.wall_s, cpu + run.cpu_s
        frames.append(run.runs.assign(**{k: v for k, v in axes.items()}, cell=cell["cell"],
                                      seed=run.runs["seed"].rank(method="dense").astype(int) - 1))
    return GridRun("independent", wall, cpu, pd.concat(frames, ignore_index=True))


def effects_of(runs: pd.DataFrame, margin: float) -> pd.DataFrame:
    """The report's effects of a benchmark's runs (cells only: the pairing is between cells)."""
    cells = runs[runs["role"].eq("cell")].copy()
    cells["cell_id"] = cells["cell"]
    cells.attrs = {"axes": list(MILAN_BASELINES), "axis_baselines": dict(MILAN_BASELINES), "metrics": [METRIC]}
    effects = estimate_effects(cells, METRIC, margin=margin)
    return effects.set_index("effect")


@dataclass(frozen=True)
class ShareBench:
    seeds: int
    shared: GridRun
    unshared: GridRun
    independent: GridRun | None
    margin: float
    paper_flops: tuple[float, float]  # the paper grid's training FLOPs per image: alone, shared


def share_bench(out: Path, seeds: int = 3, independent: bool = True) -> ShareBench:
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    margin = load_grid(find_grid_file(GRID)).spec.margin
    shared = _ablate("shared", GRID, out, seeds=seeds, share=True)
    unshared = _ablate("unshared", GRID, out, seeds=seeds, share=False)
    indep = None
    if independent:
        cells = shared.runs[shared.runs["role"].eq("cell") & shared.runs["seed"].eq(0)]
        indep = _independent(out, seeds, cells)
    paper = load_grid(find_grid_file("milan_vitb_in1k"))
    saving = sharing_saving(paper.cells, job_groups(paper.cells, share=True,
                                                    max_cells=paper.resources.max_cells_per_job))
    return ShareBench(seeds, shared, unshared, indep, margin, (saving.flops_alone, saving.flops_shared))


def _counts(run: GridRun) -> tuple[float, float]:
    return run.runs["images_loaded"].sum(), run.runs["teacher_images"].sum()


def report_lines(bench: ShareBench) -> str:
    s, u = bench.shared, bench.unshared
    lines = [f"smoke grid, {bench.seeds} seed(s), {len(s.runs)} runs each, local executor, "
             f"{os.cpu_count()} CPUs:",
             f"{'':>12} {'wall s':>8} {'CPU-s':>8} {'images decoded':>15} {'teacher images':>15}"]
    for run in (s, u):
        loads, teacher = _counts(run)
        lines.append(f"{run.label:>12} {run.wall_s:8.1f} {run.cpu_s:8.1f} {loads:15,.0f} {teacher:15,.0f}")
    lines.append(f"shared / unshared: wall {s.wall_s / u.wall_s:.2f}x, CPU-seconds {s.cpu_s / u.cpu_s:.2f}x, "
                 f"images decoded {_counts(s)[0] / _counts(u)[0]:.2f}x, "
                 f"teacher forwards {_counts(s)[1] / _counts(u)[1]:.2f}x")
    merged = s.runs.merge(u.runs, on=["cell", "seed"], suffixes=("_shared", "_alone"))
    diffs = {k: float((merged[f"{k}_shared"] - merged[f"{k}_alone"]).abs().max()) for k in COMPARED}
    lines.append(f"largest |shared - alone| over {len(merged)} runs: "
                 + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    if bench.independent is not None:
        paired, indep = effects_of(s.runs, bench.margin), effects_of(bench.independent.runs, bench.margin)
        lines.append(f"main effects on {METRIC}, {bench.seeds} seeds, 95% interval width (seeds for a "
                     f"{bench.margin:g}-point effect at 80% power):")
        for name in MAIN_EFFECTS:
            p, i = paired.loc[name], indep.loc[name]
            lines.append(f"  {name:>8}: paired {p['ci_high'] - p['ci_low']:.2f} ({p['seeds_needed']}), "
                         f"independent {i['ci_high'] - i['ci_low']:.2f} ({i['seeds_needed']})")
        lines.append(f"  independent cells took {bench.independent.wall_s:.1f} s wall, "
                     f"{bench.independent.cpu_s:.1f} CPU-s")
    alone, shared = bench.paper_flops
    lines.append(f"paper grid (milan_vitb_in1k), training GFLOPs per image over its cells: alone "
                 f"{alone / 1e9:.1f}, shared {shared / 1e9:.1f} ({1 - shared / alone:.0%} fewer)")
    return "\n".join(lines)

