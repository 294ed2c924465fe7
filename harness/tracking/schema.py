"""What milan-bench writes to MLflow: tag and param names, value encoding; no MLflow import.

* One experiment per grid; one parent run per ``ablate`` invocation (``role=ablate``, named
  ``"<grid> <UTC time>"``); its ``grid.axes`` tag gives the report the axes (grid order, levels,
  baselines), ``grid.paper_setting`` whether to add the paper's numbers, ``grid.margin`` the
  verdicts' equivalence margin, ``grid_file`` and ``grid.options`` the grid YAML and its ``--set`` /
  ``--axis`` options (the report's ``--seeds`` command).
* One child run per cell x seed (``role=cell``, ``mlflow.parentRunId``), named ``"<cell> seed=<seed>"``,
  kept across requeues and resubmissions. Params: the flattened config (:func:`encode_param`).
  Tags: :func:`cell_tags`, then from the job ``status`` (a :class:`~harness.run.cell_state.CellState`),
  ``failure_reason``, ``stage``, ``step``, ``attempts``, ``slurm.*``, ``checkpoint``.
* Metrics: ``metrics.jsonl`` (per step), then ``results.json``'s summary; artifacts ``config.yaml`` and
  ``metrics.jsonl``. The run folder is the truth, the run its mirror (:mod:`harness.tracking.sync`).
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.config import format_value as encode_param
from harness.config import parse_value
from harness.core.errors import UserError
from harness.evaluate.protocols import PROTOCOLS
from harness.run.results import RUN_METRICS


class TrackingError(UserError):
    """The tracking store cannot be used; the message names the problem and the fix."""


ROLE, ROLE_PARENT, ROLE_CELL = "role", "ablate", "cell"
GRID, GRID_AXES, GRID_PAPER_SETTING = "grid", "grid.axes", "grid.paper_setting"
# the report's equivalence margin; the grid YAML and the --set/--axis options it ran with (its --seeds command)
GRID_MARGIN, GRID_FILE_TAG, GRID_OPTIONS = "grid.margin", "grid_file", "grid.options"
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
SLURM_JOB_ID, SLURM_RESTART_COUNT = "slurm.job_id", "slurm.restart_count"
GROUP_SIZE = "group_size"  # the cells its latest job trained together (harness.config.student_side), this one included
PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own tag: nests the cell under its parent
LOSS_KEY, LR_KEY = "train/loss", "train/lr"
# The runs frame's ``role`` column (harness.tracking.read): a grid cell, or one of the grid's reference runs: the
# untrained encoder (a 0-epoch cell), or the frozen teacher's image tower (eval.encoder: teacher).
CELL_ROLE, RANDOM_INIT, TEACHER = "cell", "random_init", "teacher"

# Report metric column -> MLflow metric keys, first present wins: each protocol's headline metric and the
# run's own (harness.run.results); the pretraining loop also logs throughput and memory as train/<key>, which a
# run that has not finished its evaluation has alone.
REPORT_METRICS: dict[str, tuple[str, ...]] = {
    **{p.headline.key: (p.headline.key,) for p in PROTOCOLS.values()},
    **{m.key: (m.key, *(("train/" + m.key,) if m.key in ("images_per_s", "peak_memory_mb") else ()))
       for m in RUN_METRICS},
}

MAX_TAG_CHARS = 5000  # MLflow's limit is 8000; failure reasons are cut well before


@functools.lru_cache(maxsize=65536)
def decode_param(text: str | None) -> Any:
    """Inverse of :func:`encode_param` (numbers, bools and null come back typed); lists and dicts
    stay text (hashable, to group on)."""
    value = parse_value(text) if text is not None else None
    return text if isinstance(value, (list, dict)) else value


def axes_json(axes: Sequence[Mapping[str, Any]]) -> str:
    """The ``grid.axes`` tag: ``[{"name", "values", "baseline"}, ...]``."""
    for axis in axes:
        if axis["baseline"] not in axis["values"]:
            raise TrackingError(f"grid axis {axis['name']}: baseline {axis['baseline']!r} is not one of its "
                                f"values {list(axis['values'])}")
    text = json.dumps([dict(axis) for axis in axes], default=str)
    if len(text) > MAX_TAG_CHARS:
        raise TrackingError(f"the grid's axes take {len(text)} characters as a tag (limit "
                            f"{MAX_TAG_CHARS}): use fewer or shorter axis values")
    return text


def parse_axes(text: str | None) -> list[dict[str, Any]]:
    """The ``grid.axes`` tag back as a list of dicts (empty when absent or unreadable)."""
    try:
        spec = json.loads(text) if text else []
    except json.JSONDecodeError:
        return []
    return [a for a in spec if isinstance(a, dict) and {"name", "values", "baseline"} <= a.keys()]


def tag_text(value: Any) -> str:
    """Any value as tag text (tags are strings), cut to the tag limit."""
    text = encode_param(value) if not isinstance(value, str) else value
    return text if len(text) <= MAX_TAG_CHARS else text[: MAX_TAG_CHARS - 3] + "..."


def one_line(reason: str | None) -> str:
    """A failure reason as one line."""
    lines = [line.strip() for line in str(reason or "").splitlines() if line.strip()]
    return tag_text(" | ".join(lines))


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


def experiment_description(grid: str, description: str = "") -> str:
    """The grid experiment's description in the MLflow UI (its documented ``mlflow.note.content``
    tag): what the runs are and how to see the cells side by side, which no documented setting
    arranges for the user."""
    what = f"{description.strip()}\n\n" if description.strip() else ""
    return (f"{what}milan-bench grid `{grid}`. Each `bench.py ablate` is a parent run ({ROLE}={ROLE_PARENT}); its "
            f"child runs are the grid's cells, one per cell and seed ({ROLE}={ROLE_CELL}), named by their axis "
            f"values. To compare the cells: in the runs table, search `tags.{ROLE} = '{ROLE_CELL}'`, and add the "
            f"columns of the metrics (linear_top1, knn_top1, ...) and the tags `{STATUS}` and `{SLURM_JOB_ID}`. "
            "`bench.py report` writes the comparison tables, the verdicts and the plots.")


def git_commit_of() -> str | None:
    """HEAD commit of the repository holding this package, or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
