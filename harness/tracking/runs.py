"""Creating and updating the parent (``ablate``) and child (cell) runs, and their artifacts.

Every function takes the tracking URI and run ids only, so it works the same from the
submitting command and from a job on another host. See :mod:`harness.tracking.schema` for
the tags and params written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.tracking import schema as S
from harness.tracking.schema import TrackingError
from harness.tracking.store import client

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_TAGS_PER_BATCH = 100


def _tags(tags: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): S.tag_text(v) for k, v in tags.items() if v is not None}


def start_parent_run(uri: str, experiment_id: str, *, grid: str, tags: Mapping[str, Any],
                     axes: Sequence[Mapping[str, Any]] | None = None, paper_setting: bool = False,
                     run_name: str | None = None) -> str:
    """Create the parent run of one ``ablate`` invocation; returns its run id.

    ``axes``: the grid's axes in order, ``[{"name", "values", "baseline"}, ...]`` (stored as the
    ``grid.axes`` tag; the report reads axis order and baselines from it).
    """
    name = run_name or f"{grid} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC"
    all_tags = {S.ROLE: S.ROLE_PARENT, S.GRID: grid, S.STATUS: "running",
                S.GRID_PAPER_SETTING: "true" if paper_setting else "false",
                S.HOST: _hostname(), **tags}
    if axes is not None:
        all_tags[S.GRID_AXES] = S.axes_json(axes)
    run = client(uri).create_run(experiment_id, tags=_tags(all_tags), run_name=name)
    return run.info.run_id


def finish_run(uri: str, run_id: str, status: str, tags: Mapping[str, Any] | None = None) -> None:
    """End a run (parent or cell) with ``status`` (done | failed | killed, or an MLflow status)
    after setting ``tags``; the ``status`` tag is set too."""
    mlflow_status = {"done": "FINISHED", "failed": "FAILED", "killed": "KILLED"}.get(status, status.upper())
    if mlflow_status not in ("FINISHED", "FAILED", "KILLED"):
        raise TrackingError(f"finish_run status {status!r}: use done, failed or killed")
    tag_status = {"FINISHED": "done", "FAILED": "failed", "KILLED": "killed"}[mlflow_status]
    set_run_tags(uri, run_id, {**(tags or {}), S.STATUS: tag_status})
    client(uri).set_terminated(run_id, mlflow_status)


def create_cell_run(uri: str, experiment_id: str, *, parent_run_id: str, run_name: str,
                    params: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    """Create one cell's child run: one ``create_run`` (with all tags) and one ``log_batch``
    (all params, encoded by :func:`~harness.tracking.schema.encode_param`). Status "pending".

    ``params``: ``RunConfig.flat()``; ``tags``: :func:`~harness.tracking.schema.cell_tags`.
    """
    from mlflow.entities import Param

    all_tags = {S.ROLE: S.ROLE_CELL, S.STATUS: "pending", S.FAILURE_REASON: "", **tags,
                S.PARENT_RUN_ID: parent_run_id}
    mlflow_client = client(uri)
    run = mlflow_client.create_run(experiment_id, tags=_tags(all_tags), run_name=run_name)
    run_id = run.info.run_id
    param_list = [Param(str(k), S.encode_param(v)) for k, v in params.items()]
    if param_list:
        mlflow_client.log_batch(run_id, params=param_list)  # the client chunks by 100 itself
    return run_id


def create_cell_runs(uri: str, experiment_id: str, *, parent_run_id: str,
                     cells: Sequence[Mapping[str, Any]], threads: int = 8) -> list[str]:
    """:func:`create_cell_run` for many cells (each a mapping with ``run_name``, ``params``,
    ``tags``); run ids in the same order. Over HTTP the requests go out from ``threads``
    threads (the server handles them in parallel: about 2x faster for a 64-cell grid); a
    SQLite store takes them one by one (its writes are serialised anyway)."""
    from concurrent.futures import ThreadPoolExecutor

    from harness.tracking.store import is_http

    def one(cell: Mapping[str, Any]) -> str:
        return create_cell_run(uri, experiment_id, parent_run_id=parent_run_id, run_name=cell["run_name"],
                               params=cell["params"], tags=cell["tags"])

    if not is_http(uri) or threads <= 1 or len(cells) <= 1:
        return [one(cell) for cell in cells]
    with ThreadPoolExecutor(min(threads, len(cells))) as pool:
        return list(pool.map(one, cells))


def set_run_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set (overwrite) tags on a run, in one request."""
    from mlflow.entities import RunTag

    tag_list = [RunTag(k, v) for k, v in _tags(tags).items()]
    if tag_list:
        client(uri).log_batch(run_id, tags=tag_list)


def mark_run(uri: str, run_id: str, status: str, reason: str | None = None) -> None:
    """Set a cell's ``status`` / ``failure_reason`` tags and the matching MLflow run status.

    running, preempted, requeued -> RUNNING (end time cleared); done -> FINISHED;
    failed -> FAILED. The reason is kept as one line; it is cleared when none is given.
    """
    if status not in S.STATUSES:
        raise TrackingError(f"run status {status!r}: use one of {', '.join(S.STATUSES)}")
    mlflow_client = client(uri)
    set_run_tags(uri, run_id, {S.STATUS: status, S.FAILURE_REASON: S.one_line(reason)})
    mlflow_status = S.STATUSES[status]
    if mlflow_status == "RUNNING":
        mlflow_client.update_run(run_id, status="RUNNING")
    else:
        mlflow_client.set_terminated(run_id, mlflow_status)


def get_status(uri: str, run_id: str) -> tuple[str, str | None]:
    """(status, failure reason or None) of a cell run, from its tags."""
    run = client(uri).get_run(run_id)
    tags = run.data.tags
    status = tags.get(S.STATUS) or S.FROM_MLFLOW_STATUS.get(run.info.status, "running")
    return status, tags.get(S.FAILURE_REASON) or None


def log_summary_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Log a run's final numbers (``RunResult.metrics``) in one request. Safe to repeat: the
    report reads each metric's latest value."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(str(k), float(v), now, int(step)) for k, v in metrics.items() if v is not None]
    if batch:
        client(uri).log_batch(run_id, metrics=batch)


# --- artifacts -------------------------------------------------------------------------------

def log_text(uri: str, run_id: str, text: str, name: str) -> None:
    client(uri).log_text(run_id, text, name)


def log_artifact(uri: str, run_id: str, path: str | os.PathLike, artifact_path: str | None = None) -> None:
    client(uri).log_artifact(run_id, os.fspath(path), artifact_path)


def log_files(uri: str, run_id: str, files: Iterable[str | os.PathLike], root: str | os.PathLike,
              artifact_path: str | None = None) -> int:
    """Log ``files`` keeping their layout relative to ``root`` (under ``artifact_path``)."""
    root = Path(root)
    count = 0
    for file in files:
        rel = Path(file).resolve().relative_to(root.resolve())
        parent = rel.parent.as_posix()
        dest = "/".join(p for p in (artifact_path, parent if parent != "." else None) if p) or None
        client(uri).log_artifact(run_id, os.fspath(file), dest)
        count += 1
    return count


def log_config(uri: str, run_id: str, cfg: Any) -> None:
    """The resolved config as ``config.yaml``."""
    log_text(uri, run_id, cfg.to_yaml(), "config.yaml")


def log_checkpoint_path(uri: str, run_id: str, checkpoint: str | os.PathLike, *, upload: bool = False) -> None:
    """Record the final checkpoint's path (tag ``checkpoint`` and ``checkpoint_path.txt``);
    upload the file itself only with ``upload`` (checkpoints are large)."""
    path = str(Path(checkpoint).absolute())
    set_run_tags(uri, run_id, {S.CHECKPOINT: path})
    log_text(uri, run_id, path + "\n", "checkpoint_path.txt")
    if upload:
        log_artifact(uri, run_id, checkpoint, "checkpoints")


def loss_history(uri: str, run_id: str, key: str = S.LOSS_KEY) -> list[tuple[int, float]]:
    """(step, value) of a metric's full history, sorted by step (last value per step)."""
    points = {m.step: m.value for m in sorted(client(uri).get_metric_history(run_id, key),
                                             key=lambda m: (m.step, m.timestamp))}
    return sorted(points.items())


def log_loss_figure(uri: str, run_id: str, *, metrics_jsonl: str | os.PathLike | None = None,
                    cell: str | None = None, target: str | None = None) -> bool:
    """Plot the run's training loss (from ``metrics.jsonl`` when given, else from MLflow) and
    log it as ``figures/loss_curve.png``. Returns False when there is no loss to plot."""
    import pandas as pd

    from harness.report.figures import plot_loss_curves
    from harness.train.metrics_log import read_jsonl

    if metrics_jsonl is not None and Path(metrics_jsonl).is_file():
        points = {int(r["step"]): float(r[S.LOSS_KEY]) for r in read_jsonl(Path(metrics_jsonl))
                  if r.get("step") is not None and S.LOSS_KEY in r}
        history = sorted(points.items())
    else:
        history = loss_history(uri, run_id)
    if not history:
        return False
    if cell is None or target is None:
        tags, params = (run := client(uri).get_run(run_id)).data.tags, run.data.params
        cell = cell or tags.get(S.CELL) or run.info.run_name or run_id
        target = target or params.get("model.target") or "loss"
    steps, losses = zip(*history)
    curves = pd.DataFrame({"cell_id": run_id, "cell": cell, "seed": 0, "target": target,
                           "step": steps, "loss": losses})
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_loss_curves(curves, Path(tmp) / "loss_curve.png")
        log_artifact(uri, run_id, png, "figures")
    return True


def log_cell_artifacts(uri: str, run_id: str, *, cfg: Any = None, run_dir: str | os.PathLike | None = None,
                       checkpoint: str | os.PathLike | None = None, log_checkpoint: bool = False,
                       loss_figure: bool = True) -> None:
    """What a finished cell leaves in its run: ``config.yaml``, ``figures/loss_curve.png`` and
    the checkpoint's path (the checkpoint file itself only with ``log_checkpoint``).

    A figure that cannot be drawn is logged as a warning, not raised: the run's numbers are
    already safe by then.
    """
    if cfg is not None:
        log_config(uri, run_id, cfg)
    if checkpoint is not None:
        log_checkpoint_path(uri, run_id, checkpoint, upload=log_checkpoint)
    if loss_figure:
        jsonl = Path(run_dir) / "metrics.jsonl" if run_dir is not None else None
        try:
            log_loss_figure(uri, run_id, metrics_jsonl=jsonl,
                            target=cfg.model.target if cfg is not None else None)
        except Exception as err:  # noqa: BLE001 - a figure never fails a run
            log.warning("could not log the loss-curve figure of run %s: %s", run_id, err)


def _hostname() -> str:
    import socket

    return socket.getfqdn()
