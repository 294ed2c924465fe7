"""Creating the parent (``ablate``) and cell runs and setting their state (tags and params:
:mod:`harness.tracking.schema`). URIs and run ids only: the same from ``ablate`` and from a job."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from harness.run.cell_state import CellState
from harness.tracking import schema as S
from harness.tracking.store import client, is_http


# An MLflow run is created RUNNING; a pending cell's run stays so (its ``status`` tag says pending).
RUN_STATUS: dict[CellState, str] = {
    CellState.MISSING: "RUNNING",
    CellState.PENDING: "RUNNING",
    CellState.RUNNING: "RUNNING",
    CellState.REQUEUED: "RUNNING",
    CellState.PREEMPTED: "RUNNING",
    CellState.DONE: "FINISHED",
    CellState.FAILED: "FAILED",
}


def state_of_run_status(status: str) -> CellState:
    """A state for a run that has no ``status`` tag, from its MLflow run status."""
    return {"FINISHED": CellState.DONE, "FAILED": CellState.FAILED, "KILLED": CellState.FAILED,
            "SCHEDULED": CellState.PENDING}.get(status, CellState.RUNNING)


def _tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): S.tag_text(v) for k, v in tags.items() if v is not None}


def start_parent_run(uri: str, experiment_id: str, *, grid: str, tags: Mapping[str, Any],
                     axes: Sequence[Mapping[str, Any]], paper_setting: bool = False) -> str:
    """Create the parent run of one ``ablate`` invocation; returns its run id."""
    name = f"{grid} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC"
    all_tags = {S.ROLE: S.ROLE_PARENT, S.GRID: grid, S.STATUS: CellState.RUNNING, S.GRID_AXES: S.axes_json(axes),
                S.GRID_PAPER_SETTING: "true" if paper_setting else "false", S.HOST: socket.getfqdn(), **tags}
    return client(uri).create_run(experiment_id, tags=_tags(all_tags), run_name=name).info.run_id


def create_cell_runs(uri: str, experiment_id: str, *, parent_run_id: str,
                     cells: Sequence[Mapping[str, Any]]) -> list[str]:
    """One pending child run per cell (``run_name``, ``params``, ``tags``); run ids in order. Over HTTP
    from 8 threads (the server handles them in parallel); a SQLite store takes one writer at a time."""
    from mlflow.entities import Param

    mlflow_client = client(uri)

    def one(cell: Mapping[str, Any]) -> str:
        tags = {S.ROLE: S.ROLE_CELL, S.STATUS: CellState.PENDING, S.FAILURE_REASON: "", **cell["tags"],
                S.PARENT_RUN_ID: parent_run_id}
        run_id = mlflow_client.create_run(experiment_id, tags=_tags(tags), run_name=cell["run_name"]).info.run_id
        mlflow_client.log_batch(run_id, params=[Param(str(k), S.encode_param(v)) for k, v in cell["params"].items()])
        return run_id

    if not is_http(uri) or len(cells) < 2:
        return [one(cell) for cell in cells]
    with ThreadPoolExecutor(min(8, len(cells))) as pool:
        return list(pool.map(one, cells))


T = TypeVar("T")
R = TypeVar("R")


def per_run(uri: str, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``fn`` over ``items``, each a call or two to the store about one run: concurrent over HTTP,
    where each call mostly waits on the server; one after another on SQLite, which takes one writer
    at a time."""
    if not is_http(uri) or len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(fn, items))


def set_run_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    if tag_list := [RunTag(k, v) for k, v in _tags(tags).items()]:
        client(uri).log_batch(run_id, tags=tag_list)


def set_state(uri: str, run_id: str, state: CellState, reason: str | None = None,
              tags: Mapping[str, Any] | None = None) -> None:
    """A run's ``status`` / ``failure_reason`` tags (and ``tags``) and the MLflow status that mirrors
    ``state`` (an active state reopens an ended run: a resubmitted cell keeps its run)."""
    state = CellState(state)
    set_run_tags(uri, run_id, {**(tags or {}), S.STATUS: state, S.FAILURE_REASON: S.one_line(reason)})
    if state.terminal:
        client(uri).set_terminated(run_id, RUN_STATUS[state])
    else:
        client(uri).update_run(run_id, status=RUN_STATUS[state])


def run_state(uri: str, run_id: str) -> CellState:
    """The state a run's tags say (its MLflow status when it has no ``status`` tag)."""
    run = client(uri).get_run(run_id)
    return CellState.parse(run.data.tags.get(S.STATUS)) or state_of_run_status(run.info.status)


def log_artifacts(uri: str, run_id: str, files: Iterable[Path], root: Path, prefix: str) -> None:
    """Log ``files`` to the run under ``prefix/``, keeping their layout below ``root``."""
    mlflow_client = client(uri)
    for file in files:
        folder = Path(file).resolve().relative_to(root.resolve()).parent.as_posix()
        mlflow_client.log_artifact(run_id, str(file), prefix if folder == "." else f"{prefix}/{folder}")
