"""The report's verdicts in words: the headline paragraph of ``report.md`` and the command and
cost of the seeds that would settle what is still open.

Input: the ``effects`` frame of :func:`harness.report.effects.estimate_effects` (its ``attrs``
carry the margin, alpha, method and ``seeds_to_resolve``) and the ``runs`` frame (cost, seeds,
``attrs["grid_file"]`` and ``attrs["grid_options"]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from harness.report.effects import NEGLIGIBLE, ONE_SEED, RESOLVED_DOWN, RESOLVED_UP
from harness.report.tables import DONE, device_hours

RESOLVED = (RESOLVED_UP, RESOLVED_DOWN)
# Unit of each device-hours column, in words
HOURS_UNITS = {"gpu_hours": "GPU-hours", "cpu_core_hours": "CPU core-hours"}


@dataclass(frozen=True)
class SeedsPlan:
    """What settling the open effects would take: ``seeds`` in all (None: as many as the
    analysis searches are not enough), the command, and the extra cost (None when no run reports one)."""

    seeds: int | None
    current: int
    command: str
    extra_hours: float | None
    unit: str


def cost_so_far(runs: pd.DataFrame) -> tuple[float | None, str]:
    """The grid's device-hours over every run that reports one (failed ones cost too), and the unit."""
    hours = device_hours(runs)
    if hours is None:
        return None, "device-hours"
    return float(hours.sum()), HOURS_UNITS[hours.name]


def seeds_plan(effects: pd.DataFrame, runs: pd.DataFrame) -> SeedsPlan | None:
    """The seeds (counting the ones run) that would resolve every open effect at the margin, the
    ``bench.py ablate`` command that adds them (finished runs are skipped, never rerun) and what
    the new runs would cost at the mean cost of each cell's runs so far; None when nothing is open."""
    open_effects = effects[~effects["verdict"].isin([*RESOLVED, NEGLIGIBLE])]
    if open_effects.empty:
        return None
    current = int(runs.loc[runs["status"].eq(DONE), "seed"].nunique())
    target = effects.attrs.get("seeds_to_resolve")
    if target is None or pd.isna(target):
        # only effects without an interval are open (one seed): a second seed gives them one
        target = max(current + 1, 2) if open_effects["verdict"].eq(ONE_SEED).any() else None
    grid = runs.attrs.get("grid_file") or runs.attrs.get("grid", "GRID")
    options = runs.attrs.get("grid_options") or ""
    capped = target is not None and target >= effects.attrs.get("max_seeds", float("inf"))
    seeds = int(target) if target is not None and not capped else None
    command = " ".join(filter(None, ["python bench.py ablate", grid, options, f"--seeds {seeds or 'N'}"]))
    hours = device_hours(runs)
    extra = None
    if hours is not None and seeds is not None:
        per_seed = hours.groupby(runs["cell_id"]).mean().sum()  # one more run of every cell
        extra = float(per_seed * max(seeds - current, 0))
    unit = HOURS_UNITS[hours.name] if hours is not None else "device-hours"
    return SeedsPlan(seeds, current, command, extra, unit)


def _effect_words(row: pd.Series) -> str:
    if pd.isna(row["ci_low"]):
        return f"**{row['effect']}** ({row['levels']}) {row['estimate']:+.2f}"
    return (f"**{row['effect']}** ({row['levels']}) {row['estimate']:+.2f} "
            f"[{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]")


def headline(effects: pd.DataFrame, runs: pd.DataFrame, metric_words: str) -> str:
    """The paragraph at the top of report.md: what matters, by how much and how surely; what is
    not established; what establishing it would cost."""
    if effects.empty:
        return "No effects could be estimated: no axis has finished runs at two of its values."
    a = effects.attrs
    n_seeds = int(runs.loc[runs["status"].eq(DONE), "seed"].nunique())
    family = int(effects["p_value"].notna().sum())
    tested = (f"95% intervals; Holm-adjusted over {family} effects at α = {a['alpha']:g}" if family else
              "no effect has an interval")
    lines = [
        f"**Verdicts** on {metric_words}, from {n_seeds} seed{'s' if n_seeds != 1 else ''}: "
        f"{a['method']}; {tested}; negligible means the whole interval lies within ±{a['margin']:g} points."
    ]
    resolved = effects[effects["verdict"].isin(RESOLVED)]
    negligible = effects[effects["verdict"].eq(NEGLIGIBLE)]
    open_effects = effects[~effects["verdict"].isin([*RESOLVED, NEGLIGIBLE])]
    if len(resolved):
        lines.append("Matters: " + "; ".join(
            f"{_effect_words(r)}, p_holm {r['p_holm']:.2g}" for _, r in resolved.iterrows()) + ".")
    else:
        lines.append("Nothing is resolved: no effect differs from zero after the Holm adjustment.")
    if len(negligible):
        lines.append("Negligible: " + "; ".join(_effect_words(r) for _, r in negligible.iterrows()) + ".")
    if len(open_effects):
        lines.append("Not established: " + "; ".join(
            f"{_effect_words(r)} ({r['verdict']})" for _, r in open_effects.iterrows()) + ".")
        plan = seeds_plan(effects, runs)
        if plan is not None:
            lines.append(_plan_words(plan, a.get("power", 0.8), a["margin"]))
    lines.append(pairing_words(runs, blocked=n_seeds > 1))
    total, unit = cost_so_far(runs)
    if total is not None:
        shared = " (a group job's hours apportioned to its cells, see below)" if _grouped(runs).any() else ""
        lines.append(f"This grid has cost {total:.3g} {unit} so far{shared}.")
    return " ".join(lines)


# How a group job's device-hours reach its cells (harness.train.pretrain.apportion).
APPORTIONING = ("a group job's device-hours are apportioned to its cells: each cell gets its own student's "
                "compute, an equal share of the teacher's time among the cells that need the teacher, and an "
                "equal share of the rest (data loading, masks, logging); then its own evaluation. The shares add "
                "up to the job's time, so the grid's total is what it really cost")


def _grouped(runs: pd.DataFrame) -> pd.Series:
    return runs["group_size"].gt(1) if "group_size" in runs else pd.Series(False, index=runs.index)


def pairing_words(runs: pd.DataFrame, blocked: bool) -> str:
    """Which cells were paired, and how the statistics use it."""
    done = runs[runs["status"].eq(DONE)]
    text = ("Cells of one seed are paired: they start from the same encoder and see the same batches in the same "
            "order, and cells that sample masks alike see the same masks")
    text += ("; the intervals compare cells within each seed (the seed is the OLS block)." if blocked else ".")
    grouped = done[_grouped(done)]
    if not grouped.empty:
        jobs = grouped.groupby("seed")["job"].nunique()
        text += (f" {len(grouped)} of {len(done)} finished runs trained in group jobs that shared one data stream "
                 f"and one teacher forward ({', '.join(f'seed {s}: {n} job' + ('s' if n > 1 else '') for s, n in jobs.items())}"
                 f"; the report's group-jobs table); {APPORTIONING}.")
    return text


def _plan_words(plan: SeedsPlan, power: float, margin: float) -> str:
    if plan.seeds is None:
        return (f"Resolving the open effects at ±{margin:g} points would take more seeds than the analysis "
                "searches: shrink the noise (more evaluation data, longer pretraining) instead.")
    cost = f", about {plan.extra_hours:.3g} {plan.unit} more" if plan.extra_hours is not None else ""
    return (f"An effect of {margin:g} points would be resolved with {power:.0%} power at {plan.seeds} seeds "
            f"({plan.seeds - plan.current} more{cost}): `{plan.command}`.")
