"""What milan-bench writes to MLflow: tag and param names, value encoding; no MLflow import.

* One experiment per grid; one parent run per ``ablate`` invocation (tag ``role=ablate``, named
  ``"<grid> <UTC time>"``), whose ``grid.axes`` tag (JSON ``[{"name", "values", "baseline"}]``,
  grid order) gives the report the axes, and ``grid.paper_setting`` whether to add the paper's
  numbers.
* One child run per cell x seed (``role=cell``, ``mlflow.parentRunId``), named
  ``"<cell> seed=<seed>"`` (:attr:`harness.grid.Cell.run_name`), kept across requeues and
  resubmissions. Params: the flattened config (``RunConfig.flat()``, :func:`encode_param`).
  Tags: :func:`cell_tags` (grid, ids, seed, cell, ``axis.<name>``, executor, host, git commit,
  run folder), then from the job: ``status`` (a :class:`~harness.cell_state.CellState`),
  ``failure_reason``, ``stage``, ``step``, ``attempts``, ``slurm.*``, ``checkpoint``.
* Metrics: everything in the run folder's ``metrics.jsonl`` (``train/loss``, ``train/lr`` per
  step, evaluation metrics at the last step), then ``results.json``'s summary; artifacts
  ``config.yaml`` and ``metrics.jsonl``. The folder is the truth, the run its mirror
  (:mod:`harness.tracking.sync`).
"""

from __future__ import annotations

import functools
import json
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from harness.config import format_value as encode_param
from harness.config import parse_value
from harness.errors import UserError


class TrackingError(UserError):
    """The tracking store cannot be used; the message names the problem and the fix."""


# --- names -----------------------------------------------------------------------------------

ROLE = "role"
ROLE_PARENT = "ablate"
ROLE_CELL = "cell"
GRID = "grid"
GRID_AXES = "grid.axes"
GRID_PAPER_SETTING = "grid.paper_setting"
CELL_ID = "cell_id"
CONFIG_RUN_ID = "config_run_id"
SEED = "seed"
CELL = "cell"
AXIS_PREFIX = "axis."
EXECUTOR = "executor"
HOST = "host"
GIT_COMMIT = "git_commit"
RUN_DIR = "run_dir"
STATUS = "status"
FAILURE_REASON = "failure_reason"
CHECKPOINT = "checkpoint"
SLURM_JOB_ID = "slurm.job_id"
SLURM_ARRAY_JOB_ID = "slurm.array_job_id"
SLURM_ARRAY_TASK_ID = "slurm.array_task_id"
SLURM_RESTART_COUNT = "slurm.restart_count"
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own tag: nests the cell under its parent
UI_VIEW = "grid-cells"  # the saved runs-table view of an experiment's cells (store.prepare_store)

LOSS_KEY = "train/loss"
LR_KEY = "train/lr"

# Report metric column -> MLflow metric keys, first present wins.
REPORT_METRICS: dict[str, tuple[str, ...]] = {
    "linear_top1": ("linear_top1",),
    "knn_top1": ("knn_top1",),
    "finetune_top1": ("finetune_top1",),
    "final_loss": ("final_loss",),
    "images_per_s": ("images_per_s", "train/images_per_s"),
    "peak_memory_mb": ("peak_memory_mb", "train/peak_memory_mb"),
    "gpu_hours": ("device_hours",),
}

MAX_TAG_CHARS = 5000  # MLflow's limit is 8000; failure reasons are cut well before


# --- value encoding --------------------------------------------------------------------------

@functools.lru_cache(maxsize=65536)
def decode_param(text: str | None) -> Any:
    """Inverse of :func:`encode_param` through the one value parser (:func:`harness.config.parse_value`):
    numbers, bools and null come back typed; lists and dicts stay text (hashable, to group on)."""
    if text is None:
        return None
    value = parse_value(text)
    return text if isinstance(value, (list, dict)) else value


def axes_json(axes: Sequence[Mapping[str, Any]]) -> str:
    """Validate and encode the ``grid.axes`` tag: ``[{"name", "values", "baseline"}, ...]``."""
    spec = []
    for axis in axes:
        try:
            name, values, baseline = axis["name"], list(axis["values"]), axis["baseline"]
        except (KeyError, TypeError) as err:
            raise TrackingError(f"grid axis {axis!r} needs name, values and baseline ({err})") from None
        if baseline not in values:
            raise TrackingError(f"grid axis {name}: baseline {baseline!r} is not one of its values {values}")
        spec.append({"name": str(name), "values": values, "baseline": baseline})
    text = json.dumps(spec, default=str)
    if len(text) > MAX_TAG_CHARS:
        raise TrackingError(f"the grid's axes take {len(text)} characters as a tag (limit "
                            f"{MAX_TAG_CHARS}): use fewer or shorter axis values")
    return text


def parse_axes(text: str | None) -> list[dict[str, Any]]:
    """The ``grid.axes`` tag back as a list of dicts (empty when absent or unreadable)."""
    if not text:
        return []
    try:
        spec = json.loads(text)
    except json.JSONDecodeError:
        return []
    return [a for a in spec if isinstance(a, dict) and {"name", "values", "baseline"} <= a.keys()]


def tag_text(value: Any) -> str:
    """Any value as tag text (tags are strings), cut to the tag limit."""
    text = encode_param(value) if not isinstance(value, str) else value
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."


def one_line(reason: str | None) -> str:
    """A failure reason as one line."""
    if not reason:
        return ""
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    return tag_text(" | ".join(lines))


# --- tag builders ----------------------------------------------------------------------------

def cell_tags(cfg: Any, *, grid: str, cell: str, axis_values: Mapping[str, Any], executor: str,
              git_commit: str | None = None, run_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Tags of a cell's run: ``cfg`` its resolved config, ``cell`` its name (:attr:`harness.grid.Cell.name`),
    ``axis_values`` each axis (grid order) and its value."""
    tags: dict[str, Any] = {GRID: grid, CELL_ID: cfg.cell_id(), CONFIG_RUN_ID: cfg.run_id(), SEED: cfg.seed,
                            CELL: cell, EXECUTOR: executor, HOST: socket.getfqdn(),
                            GIT_COMMIT: git_commit or git_commit_of() or "unknown",
                            **{AXIS_PREFIX + name: value for name, value in axis_values.items()}}
    if run_dir is not None:
        tags[RUN_DIR] = os.fspath(run_dir)
    return {k: tag_text(v) for k, v in tags.items()}


def git_commit_of(path: str | os.PathLike | None = None) -> str | None:
    """HEAD commit of the repository holding ``path`` (default: this package), or None."""
    import subprocess
    from pathlib import Path

    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
