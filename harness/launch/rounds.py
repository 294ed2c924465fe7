"""``ablate --until-resolved``: a grid in rounds of seeds until its verdicts resolve or the
budget runs out.

A round is the grid at more seeds (seeds 0..n-1), submitted by ``ablate`` itself: finished
cells are skipped and live ones left alone, so a round's cells train as group jobs, paired by
seed, and nothing is ever submitted twice. After each round a *decision* looks at the
finished runs (the statistics are :mod:`harness.report.sequential`'s, handed in by the CLI as
:class:`Statistics`: launch does not import report) and either stops or submits the next round.

- Local and debug executors: ``ablate`` waits for a round, so the rounds run in turn here.
- Slurm: the decision is a one-CPU job that depends on the round's jobs
  (``--dependency=afterany:<ids>``); it submits the next round and the next decision job, then
  ends. No process waits on the login node.

The chain's state is ``runs/<grid>/until_resolved.json`` (:mod:`.chain`), changed only
under the grid's lock by :func:`advance`, a step function that reads the record, does the one
thing that is missing (submit the round, record its jobs, submit its decision job, decide) and
writes it. A decision job that is killed, requeued or started twice, or ``ablate
--until-resolved`` run again by hand, calls :func:`advance` again and picks up where the
record says the chain is: the look of a round is taken once (the statistics refuse a second
look at the same round), and a round is resubmitted only through ``ablate``'s own check of
every cell's live jobs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import submitit

from harness.core.errors import UserError
from harness.grid import Grid
from harness.launch import plan, slurm
from harness.launch.ablate import AblateOutcome, AblateRequest, ablate
from harness.launch.cell_views import CellView, collect
from harness.launch.chain import CHAIN_FILE, ChainRecord, Round, budget_text, read_chain, seeds_text
from harness.launch.estimate import gpu_hours
from harness.launch.records import GRID_FILE, SUBMITIT_DIR, GridRecord, grid_dir, grid_lock, read_record, write_record

Echo = Callable[[str], None]
# With --max-hours alone, the information fractions of the looks are counted against this many seeds.
DEFAULT_MAX_SEEDS = 20
DECISION_TIME_MIN = 30  # reading the runs and submitting a round: seconds, not minutes
DECISION_MEM_GB = 4


class Decided(Protocol):
    """What a look says (:class:`harness.report.sequential.Decision`)."""

    look: int
    seeds: int
    next_seeds: int | None
    reason: str
    summary: str
    device_hours: float | None


@dataclass(frozen=True)
class Statistics:
    """The sequential statistics, from the report layer (module-level functions: a decision
    job pickles them by reference)."""

    start: Callable[[Path, Mapping[str, Any]], Any]  # (grid dir, design) -> the statistics' record
    decide: Callable[[Path, pd.DataFrame, int], Decided]  # (grid dir, runs, look number) -> decision
    # (axes, random init, --effects, teacher runs) -> the effects in scope
    scope: Callable[[Sequence[str], bool, Sequence[str] | None, bool], list[str]]
    schedule: Callable[[int, int], list[int]]  # (first round's seeds, max seeds) -> seeds at each look


@dataclass(frozen=True)
class Budget:
    max_seeds: int | None = None
    max_hours: float | None = None  # device-hours (GPU-hours, or CPU core-hours on CPUs)


# --- starting and resuming ----------------------------------------------------------------


def until_resolved(req: AblateRequest, budget: Budget, effects: Sequence[str] | None, spending: str,
                   statistics: Statistics, echo: Echo = print) -> ChainRecord:
    """Start the grid's chain of rounds, or resume it where it stopped; bad input is a one-line
    UserError before anything is submitted."""
    if req.dry_run or req.force or req.cells or req.rehearse:
        raise UserError("--until-resolved runs whole grids in rounds: leave out --dry-run, --force, --cell and "
                        "--rehearse")
    if budget.max_seeds is None and budget.max_hours is None:
        raise UserError("--until-resolved needs a budget: give --max-seeds N and/or --max-hours H")
    grid, executor = plan.load(req.grid, sets=dict(req.sets), axes=dict(req.axes), seeds=req.seeds,
                               executor=req.executor, rehearse=False, runs_dir=req.runs_dir, echo=lambda _: None)
    first = _first_round_seeds(grid)
    max_seeds = budget.max_seeds or DEFAULT_MAX_SEEDS
    if max_seeds < first:
        raise UserError(f"--max-seeds {max_seeds} is below one round: the first round has {first} seeds; give "
                        f"--max-seeds {first} or more")
    _check_hours(grid, budget.max_hours)
    try:
        scope = statistics.scope([a.name for a in grid.axes], any(c.is_random_init for c in grid.cells), effects,
                                 any(c.is_teacher_reference for c in grid.cells))
    except ValueError as err:
        raise UserError(str(err)) from None
    gdir = grid_dir(req.runs_dir, grid.name).absolute()
    design = {"metric": grid.headline_metric, "margin": req.margin or grid.spec.margin, "max_seeds": max_seeds,
              "max_hours": budget.max_hours, "spending": spending, "schedule": statistics.schedule(first, max_seeds), "scope": scope}
    request = {**asdict(replace(req, seeds=None, executor=executor)), "runs_dir": str(req.runs_dir.absolute()),
               "grid": str(grid.path.absolute()) if grid.path else req.grid}
    with grid_lock(gdir):
        chain = read_chain(gdir)
        if chain is None:
            statistics.start(gdir, design)
            chain = ChainRecord(request=request, workdir=os.getcwd(), design=design,
                                rounds=[Round(seeds=first)], started_at=time.time())
            write_record(gdir / CHAIN_FILE, chain)
            echo(f"until resolved: {', '.join(scope)}; looks at {seeds_text(design['schedule'])} seeds "
                 f"({budget_text(design)})")
        else:
            echo(f"until resolved: resuming the chain started {time.ctime(chain.started_at)} "
                 f"({len(chain.rounds)} round(s), {chain.decided} look(s) taken)")
    return advance(gdir, statistics, echo)


def _first_round_seeds(grid: Grid) -> int:
    """The first round's seed count: the grid's seeds, which must be 0..n-1 with n >= 2."""
    if grid.spec.evaluates is not None:
        raise UserError(f"grid {grid.name} evaluates {grid.spec.evaluates}'s cells and cannot add seeds: run "
                        "--until-resolved on that grid")
    seeds = sorted({c.seed for c in grid.cells})
    if len(seeds) < 2:
        raise UserError(f"--until-resolved needs replicates and grid {grid.name} has one seed: give --seeds 2 "
                        "(or more) for the first round")
    if seeds != list(range(len(seeds))):
        raise UserError(f"--until-resolved adds seeds 0..N-1 and grid {grid.name} has seeds {seeds}: give "
                        f"--seeds {len(seeds)} instead")
    return len(seeds)


def _check_hours(grid: Grid, max_hours: float | None) -> None:
    """--max-hours below the first round's estimate (where the dry run has one: GPU cells)."""
    if max_hours is None:
        return
    if not max_hours > 0:
        raise UserError(f"--max-hours {max_hours:g} is not a budget: give a positive number of device-hours")
    estimates = gpu_hours(grid).values()
    if all(isinstance(h, float) for h in estimates) and (total := sum(estimates)) > max_hours:
        raise UserError(f"--max-hours {max_hours:g} is below one round: the first round is estimated at "
                        f"{total:.3g} GPU-hours (see --dry-run)")


# --- the step function ---------------------------------------------------------------------


def advance(gdir: Path, statistics: Statistics, echo: Echo = print) -> ChainRecord:
    """Move the chain on until it stops or waits on Slurm: submit the round the record lacks,
    take the look of a round whose jobs have all ended, or leave a decision job waiting for
    them. Safe to call any number of times, from anywhere (see the module docstring)."""
    own_job = os.environ.get("SLURM_JOB_ID")
    while True:
        with grid_lock(gdir):
            chain = read_chain(gdir)
            if chain is None:
                raise UserError(f"no {CHAIN_FILE} in {gdir}: start the chain with `bench.py ablate <grid> "
                                "--until-resolved`")
            if chain.stop_reason:
                echo(f"until resolved: stopped: {chain.stop_reason}")
                return chain
            current = chain.rounds[-1]
            request = _request(chain, current.seeds)
            if current.submitted:
                live = [v for v in _round_views(gdir, request) if v.job_alive]
                if live and request.executor == "slurm":
                    return _await_decision(gdir, chain, live, own_job, statistics, echo)
                if live:
                    echo(f"until resolved: {len(live)} cell(s) of the round still run under another ablate: run "
                         "this command again when they have ended")
                    return chain
                _decide(gdir, chain, request, statistics, echo)
                continue
        # outside the lock: a local round waits here for its jobs, and they take the lock as they end
        _submit_round(gdir, chain, request, echo)


def _request(chain: ChainRecord, seeds: int) -> AblateRequest:
    fields = {**chain.request, "seeds": seeds, "runs_dir": Path(chain.request["runs_dir"]),
              "cells": tuple(chain.request["cells"])}
    return AblateRequest(**fields)


def _submit_round(gdir: Path, chain: ChainRecord, request: AblateRequest, echo: Echo) -> None:
    """``ablate`` at the round's seeds (it skips done cells and leaves live ones alone: two callers
    at once submit each cell once), then the round's live jobs in the record."""
    echo(f"until resolved: round {len(chain.rounds)}: the grid at {request.seeds} seeds")
    os.chdir(chain.workdir)
    outcome: AblateOutcome = ablate(request, echo=echo)
    if outcome.waited and not outcome.ok:
        echo("until resolved: some cells of the round failed; its look counts the runs that finished")
    live = [v for v in _round_views(gdir, request) if v.job_alive]
    job_ids = sorted({v.record.last.job_id for v in live if v.record and v.record.last})
    with grid_lock(gdir):
        chain = read_chain(gdir)
        current = chain.rounds[-1]
        if current.seeds != request.seeds or current.submitted:  # another caller got here first
            return
        rounds = [*chain.rounds[:-1], current.model_copy(update={
            "submitted": True, "job_ids": job_ids, "submitted_at": time.time()})]
        write_record(gdir / CHAIN_FILE, chain.model_copy(update={"rounds": rounds}))


def _round_views(gdir: Path, request: AblateRequest) -> list[CellView]:
    grid, _ = plan.load(request.grid, sets=dict(request.sets), axes=dict(request.axes), seeds=request.seeds,
                        executor=request.executor, rehearse=False, runs_dir=request.runs_dir, echo=lambda _: None)
    return collect([gdir / c.folder for c in grid.cells])


def _await_decision(gdir: Path, chain: ChainRecord, live: Sequence[CellView], own_job: str | None,
                    statistics: Statistics, echo: Echo) -> ChainRecord:
    """A decision job waits for the round's live jobs: the recorded one if it is alive (and is
    not this very job), else a new one."""
    current = chain.rounds[-1]
    if current.decision_job and current.decision_job != own_job:
        state = slurm.job_states([current.decision_job])[current.decision_job]
        if not state.finished and state.state != "UNKNOWN":
            echo(f"until resolved: round {len(chain.rounds)} runs; its decision is job {current.decision_job} "
                 f"({state.state})")
            return chain
    waits_for = sorted({v.record.last.job_id.split("_")[0] for v in live if v.record and v.record.last})
    job_id = _submit_decision_job(gdir, chain, waits_for, statistics)
    rounds = [*chain.rounds[:-1], current.model_copy(update={"decision_job": job_id})]
    chain = chain.model_copy(update={"rounds": rounds})
    write_record(gdir / CHAIN_FILE, chain)
    echo(f"until resolved: round {len(chain.rounds)} queued ({current.seeds} seeds); the next decision is Slurm "
         f"job {job_id}, after job(s) {', '.join(waits_for)}")
    return chain


def _submit_decision_job(gdir: Path, chain: ChainRecord, waits_for: Sequence[str], statistics: Statistics) -> str:
    grid_record = read_record(gdir / GRID_FILE, GridRecord)
    resources = plan.load(chain.request["grid"], sets=dict(chain.request["sets"]), axes=dict(chain.request["axes"]),
                          seeds=None, executor="slurm", rehearse=False, runs_dir=Path(chain.request["runs_dir"]),
                          echo=lambda _: None)[0].resources
    executor = submitit.AutoExecutor(folder=gdir / SUBMITIT_DIR / "%j", cluster="slurm")
    extra: dict[str, Any] = {"requeue": True, "dependency": f"afterany:{':'.join(waits_for)}"}
    executor.update_parameters(name=f"milan-{grid_record.grid if grid_record else gdir.name}-decide",
                               timeout_min=DECISION_TIME_MIN, nodes=1, tasks_per_node=1, cpus_per_task=1,
                               mem_gb=DECISION_MEM_GB, slurm_additional_parameters=extra,
                               **({"slurm_partition": resources.partition} if resources.partition else {}))
    return executor.submit(DecisionJob(str(gdir), statistics)).job_id


def _decide(gdir: Path, chain: ChainRecord, request: AblateRequest, statistics: Statistics,
            echo: Echo) -> ChainRecord:
    """Take the look of the chain's last round (its jobs have all ended), and append the next
    round or the stop."""
    from harness.tracking import bounded_http, resolve_store
    from harness.tracking.read import load_runs

    look = len(chain.rounds)
    record = read_record(gdir / GRID_FILE, GridRecord)
    with bounded_http():
        uri, experiment, _ = resolve_store(record.grid, request.tracking_uri, request.runs_dir)
        runs, _ = load_runs(uri, experiment, curve_points=1)
    runs = runs[runs["seed"] < request.seeds]
    decision = statistics.decide(gdir, runs, look)
    echo(f"until resolved: {decision.summary}")
    update: dict[str, Any] = {"decided": look, "last_look": decision.summary, "device_hours": decision.device_hours}
    if decision.next_seeds is None:
        update["stop_reason"] = decision.reason
    else:
        update["rounds"] = [*chain.rounds, Round(seeds=decision.next_seeds)]
    chain = chain.model_copy(update=update)
    write_record(gdir / CHAIN_FILE, chain)
    return chain


@dataclass(frozen=True)
class DecisionJob:
    """The Slurm job that takes a round's look and submits what follows (:func:`advance`)."""

    gdir: str
    statistics: Statistics

    def __call__(self) -> str:
        chain = advance(Path(self.gdir), self.statistics, echo=lambda line: print(line, flush=True))
        return chain.stop_reason or f"round {len(chain.rounds)} queued"

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Requeued (preemption, time limit): start over; advance is idempotent."""
        return submitit.helpers.DelayedSubmission(self)
