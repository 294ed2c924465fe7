"""The record of an ``ablate --until-resolved`` chain (``runs/<grid>/until_resolved.json``) and what
``status`` shows of it. :mod:`.rounds` moves the chain on; this module only reads and describes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from harness.launch import slurm
from harness.launch.records import read_record

CHAIN_FILE = "until_resolved.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Round(_Record):
    seeds: int  # the grid at seeds 0..seeds-1
    submitted: bool = False  # ablate has queued (or, locally, run) it
    job_ids: list[str] = []  # the live jobs of its cells when it was queued
    decision_job: str | None = None  # the Slurm job that takes its look
    submitted_at: float | None = None


class ChainRecord(_Record):
    request: dict[str, Any]  # the AblateRequest of every round, seeds aside
    workdir: str  # where the rounds are submitted from
    design: dict[str, Any]  # the statistics' design: metric, margin, max_seeds, max_hours, spending, schedule, scope
    rounds: list[Round]
    decided: int = 0  # rounds whose look is taken
    last_look: str | None = None  # its summary
    device_hours: float | None = None  # spent, at the last look
    stop_reason: str | None = None
    started_at: float


def read_chain(gdir: Path) -> ChainRecord | None:
    return read_record(gdir / CHAIN_FILE, ChainRecord)


# --- what status shows -------------------------------------------------------------------


def status_lines(gdir: Path) -> list[str]:
    """The chain's round, seeds, budget spent and next decision; nothing when the grid has no chain."""
    if (chain := read_chain(gdir)) is None:
        return []
    design, current = chain.design, chain.rounds[-1]
    done_seeds = chain.rounds[chain.decided - 1].seeds if chain.decided else 0
    spent = f"{chain.device_hours:.3g} device-hours" if chain.device_hours is not None else "cost not reported yet"
    lines = [f"until resolved: round {len(chain.rounds)}, the grid at {current.seeds} seeds (looks planned at "
             f"{seeds_text(design['schedule'])}); {chain.decided} look(s) taken, at {done_seeds} seeds; spent "
             f"{spent} of {budget_text(design)}"]
    if chain.last_look:
        lines.append(f"  last {chain.last_look}")
    if chain.stop_reason:
        lines.append(f"  stopped: {chain.stop_reason}")
    elif not current.submitted:
        lines.append("  next: submit the round (interrupted: run the same ablate --until-resolved again)")
    elif current.decision_job:
        state = _job_state(current.decision_job)
        lines.append(f"  next decision: Slurm job {current.decision_job} ({state}), after job(s) "
                     f"{', '.join(sorted({j.split('_')[0] for j in current.job_ids})) or '–'}")
    else:
        lines.append("  next decision: when the round's cells end (run the same ablate --until-resolved again)")
    return lines


def _job_state(job_id: str) -> str:
    try:
        return slurm.job_states([job_id])[job_id].state
    except slurm.SlurmError:
        return "Slurm not reachable"


def seeds_text(schedule: Sequence[int]) -> str:
    return ", ".join(map(str, schedule))


def budget_text(design: Mapping[str, Any]) -> str:
    hours = f", {design['max_hours']:g} device-hours" if design.get("max_hours") is not None else ""
    return f"budget {design['max_seeds']} seeds{hours}"
