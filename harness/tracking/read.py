"""A grid's runs read from MLflow into the frames the report takes (:func:`harness.report.build_report`).

``load_runs(uri, grid_or_experiment) -> (runs, curves)``:

* ``runs``: one row per cell x seed (the runs tagged ``role=cell`` in the grid's experiment)
  with ``cell_id``, ``cell``, ``seed``, ``status``, ``failure_reason``, ``job`` (its latest job),
  ``group_size`` (the cells that job trained together, sharing data and teacher), ``role`` (``teacher`` for the frozen teacher's reference, ``eval.encoder`` teacher; ``random_init`` for
  the grid's untrained-encoder reference, whose ``pretrain.epochs`` is 0, else ``cell``), one column
  per config field (params typed back: numbers, bools, None; lists stay text), one per axis
  (typed like the grid's values), the report metrics (``linear_top1``, ``knn_top1``,
  ``finetune_top1``, ``final_loss``, ``images_per_s``, ``peak_memory_mb``, ``gpu_hours``,
  ``cpu_core_hours``) plus any other top-level metric (``linear_top5``, ...), and
  ``tracking_run_id``, ``run_name``, ``parent_run_id``, ``start_time``, ``end_time``.
  ``runs.attrs`` holds ``axes``, ``axis_baselines`` and ``paper_setting`` from the newest parent
  run's ``grid.axes`` / ``grid.paper_setting`` tags, ``margin``, ``grid_file`` and ``grid_options``
  from its ``grid.margin`` / ``grid_file`` / ``grid.options`` tags (None, None, "" when absent), ``grid``, ``metrics``, ``experiment_id``,
  ``parent_run_id`` (the newest ``ablate`` run, where the report is logged) and
  ``duplicates_dropped``.
  Failed, preempted, running and pending cells are rows like the others. A cell x seed run
  by several ``ablate`` invocations counts once: its newest finished run, else its newest run.
* ``curves``: ``train/loss`` per run (``cell_id``, ``cell``, ``seed``, ``target``, ``step``,
  ``loss``), at most ``curve_points`` evenly spaced points per run.

Only MLflow's public client API is used. Runs come from ``MlflowClient.search_runs``, page
after page. Loss curves come from each run's ``metrics.jsonl`` (the run folder, its ``run_dir``
tag, is the truth that MLflow mirrors: :mod:`harness.tracking.sync`), since one
``get_metric_history`` per run is about 11 ms on SQLite; runs whose folder this machine cannot
read (another machine's disk) fall back to ``get_metric_history``, from 8 threads over HTTP.
``bench.py report-bench`` times this on 1,000 runs.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.run.cell_state import CellState
from harness.run.folder import METRICS_FILE, read_results, read_status
from harness.tracking import schema
from harness.tracking.runs import state_of_run_status
from harness.tracking.store import check_store, client, find_experiment, is_http
from harness.train.metrics_log import read_jsonl

log = logging.getLogger(__name__)

REPORT_METRICS = list(schema.REPORT_METRICS)
CURVE_COLUMNS = ["cell_id", "cell", "seed", "target", "step", "loss"]
# metric key prefixes that are histories or monitoring, not results
NON_RESULT_PREFIXES = ("train/", "system/")
HTTP_THREADS = 8  # concurrent get_metric_history requests to a server


@dataclass
class RawRuns:
    """Runs of one experiment, one row per run (index: run id), as read from the store."""

    info: pd.DataFrame  # run_id, run_name, mlflow_status, start_time, end_time (ms)
    tags: pd.DataFrame  # a column per tag key
    params: pd.DataFrame  # a column per param key
    metrics: pd.DataFrame  # a column per metric key (its latest value)


# --- reading ---------------------------------------------------------------------------------

def search_all_runs(uri: str, experiment_id: str) -> list[Any]:
    """Every active run of an experiment: ``MlflowClient.search_runs`` page after page (as
    ``mlflow.search_runs`` does, which stops nowhere but uses the global tracking URI; a
    single ``MlflowClient.search_runs`` call stops at 1,000)."""
    mlflow_client = client(uri)
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@contextlib.contextmanager
def _collector_paused():
    """Hold Python's cyclic garbage collector. A search over 1,000 runs builds about 100,000
    objects that are all still in use; the collector's passes over them took more than half
    of the search's time (``bench.py report-bench``)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_runs(uri: str, experiment_id: str) -> RawRuns:
    """All active runs of an experiment through MLflow's search API."""
    with _collector_paused():
        found = search_all_runs(uri, experiment_id)
    index = pd.Index([run.info.run_id for run in found], name=None)
    info = pd.DataFrame([(run.info.run_id, run.info.run_name, run.info.status, run.info.start_time,
                          run.info.end_time) for run in found],
                        columns=["run_id", "run_name", "mlflow_status", "start_time", "end_time"], index=index)

    def wide(rows: list[dict], dtype: Any = object) -> pd.DataFrame:
        return pd.DataFrame.from_records(rows, index=index).astype(dtype) if rows else pd.DataFrame(index=index)

    return RawRuns(info, wide([run.data.tags for run in found]), wide([run.data.params for run in found]),
                   wide([run.data.metrics for run in found], float))


def overlay_run_folders(raw: RawRuns) -> int:
    """The run folder is the truth and MLflow its mirror: where a cell's folder (its ``run_dir`` tag)
    is readable here, its state, reason and results replace what MLflow has been sent so far (a
    server that was down, a job that has not synced yet). Returns how many runs the folders gave."""
    if schema.RUN_DIR not in raw.tags:
        return 0
    states, results = {}, {}
    for run_id, run_dir in raw.tags[schema.RUN_DIR].items():
        if not isinstance(run_dir, str) or not run_dir:
            continue
        status = read_status(Path(run_dir))
        if (state := CellState.parse(status.get("state"))) is None:
            continue
        states[run_id] = {schema.STATUS: state.value, schema.FAILURE_REASON: schema.one_line(status.get("reason"))}
        if state == CellState.DONE and (done := read_results(Path(run_dir))) is not None:
            results[run_id] = {k: float(v) for k, v in done.get("metrics", {}).items() if v is not None}
    if states:
        for column in (schema.STATUS, schema.FAILURE_REASON):
            if column not in raw.tags:
                raw.tags[column] = pd.Series(np.nan, index=raw.tags.index, dtype=object)
        raw.tags.update(pd.DataFrame.from_dict(states, orient="index", dtype=object))
    if results:
        raw.metrics = pd.DataFrame.from_dict(results, orient="index").combine_first(raw.metrics).reindex(raw.metrics.index)
    return len(states)


# --- assembling the runs frame ---------------------------------------------------------------

def _typed(values: Iterable[Any]) -> pd.Series:
    """A column of decoded values with an inferred dtype (numbers, bools, text)."""
    decoded = [schema.decode_param(v) if isinstance(v, str) else None for v in values]
    present = [v for v in decoded if v is not None and not (isinstance(v, float) and np.isnan(v))]
    if present and all(isinstance(v, bool) for v in present):
        return pd.Series(decoded, dtype="boolean" if len(present) < len(decoded) else bool)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pd.Series([np.nan if v is None else v for v in decoded], dtype=float if any(
            isinstance(v, float) for v in present) or len(present) < len(decoded) else "int64")
    if present:
        return pd.Series([None if v is None else str(v) for v in decoded], dtype="str")
    return pd.Series([None] * len(decoded), dtype=object)


def _parent_metadata(info: pd.DataFrame, tags: pd.DataFrame, experiment_name: str) -> dict[str, Any]:
    parents = info[tags.get(schema.ROLE, pd.Series(index=info.index, dtype=object)).eq(schema.ROLE_PARENT)]
    if parents.empty:
        return {"grid": experiment_name, "axes_spec": [], "paper_setting": False, "parent_run_id": None,
                "margin": None, "grid_file": None, "grid_options": ""}
    newest = parents.sort_values("start_time", ascending=False).index[0]
    row = tags.loc[newest]
    return {
        "grid": row.get(schema.GRID) if isinstance(row.get(schema.GRID), str) else experiment_name,
        "axes_spec": schema.parse_axes(row.get(schema.GRID_AXES) if isinstance(row.get(schema.GRID_AXES), str) else None),
        "paper_setting": str(row.get(schema.GRID_PAPER_SETTING, "false")).lower() == "true",
        "parent_run_id": newest,
        "margin": pd.to_numeric(row.get(schema.GRID_MARGIN), errors="coerce"),
        "grid_file": row.get(schema.GRID_FILE_TAG) if isinstance(row.get(schema.GRID_FILE_TAG), str) else None,
        "grid_options": row.get(schema.GRID_OPTIONS) if isinstance(row.get(schema.GRID_OPTIONS), str) else "",
    }


def _axis_column(text: pd.Series, spec: dict[str, Any] | None) -> pd.Series:
    """Axis tag text -> the grid's typed values (unknown text decoded like a param)."""
    if spec is None:
        return _typed(text.tolist())
    by_text = {schema.encode_param(v): v for v in spec["values"]}
    values = [by_text.get(t, schema.decode_param(t)) if isinstance(t, str) else None for t in text]
    return pd.Series(values, dtype=object).infer_objects()


def assemble(raw: RawRuns, experiment_name: str, experiment_id: str) -> pd.DataFrame:
    """The report's ``runs`` frame from the raw runs (see the module docstring)."""
    info, tags = raw.info, raw.tags
    meta = _parent_metadata(info, tags, experiment_name)
    is_cell = tags[schema.ROLE].eq(schema.ROLE_CELL).to_numpy() if schema.ROLE in tags else np.zeros(len(info), bool)
    info, tags = info[is_cell], tags[is_cell]
    params, metrics = raw.params[is_cell], raw.metrics[is_cell]

    def tag(name: str) -> pd.Series:
        return tags[name] if name in tags else pd.Series(np.nan, index=info.index, dtype=object)

    # identity and status
    frame = pd.DataFrame(index=info.index)
    frame["cell_id"] = tag(schema.CELL_ID).fillna(tag(schema.CONFIG_RUN_ID)).fillna(info["run_id"]).astype(str)
    seed_text = tag(schema.SEED).fillna(params["seed"] if "seed" in params else np.nan)
    frame["seed"] = pd.to_numeric(seed_text, errors="coerce").fillna(0).astype(int)
    frame["cell"] = tag(schema.CELL).fillna(info["run_name"]).fillna(frame["cell_id"]).astype(str)
    frame["status"] = _status(tag(schema.STATUS), info["mlflow_status"])
    # the job that trained it, and how many cells that job trained together (data and teacher shared)
    frame["job"] = tag(schema.SLURM_JOB_ID).astype(object)
    frame["group_size"] = pd.to_numeric(tag(schema.GROUP_SIZE), errors="coerce").fillna(1).astype(int)
    reason = tag(schema.FAILURE_REASON).replace("", np.nan)
    frame["failure_reason"] = reason.where(frame["status"] != CellState.DONE.value).astype("str")
    # config columns (params), typed back
    config = {key: _typed(params[key].tolist()).set_axis(info.index) for key in params.columns}
    # axis columns: the grid's order and typed values
    specs = {a["name"]: a for a in meta["axes_spec"]}
    axis_names = list(specs) or sorted(k[len(schema.AXIS_PREFIX):] for k in tags.columns if k.startswith(schema.AXIS_PREFIX))
    axes = {}
    for name in axis_names:
        text = tag(schema.AXIS_PREFIX + name)
        if text.isna().all() and name in params:
            text = params[name]
        axes[name] = _axis_column(text, specs.get(name)).set_axis(info.index)
    # metrics
    results = {}
    for column, keys in schema.REPORT_METRICS.items():
        values = pd.Series(np.nan, index=info.index)
        for key in keys:
            if key in metrics:
                values = values.fillna(metrics[key].astype(float))
        results[column] = values
    used = {k for keys in schema.REPORT_METRICS.values() for k in keys}
    extras = sorted(k for k in metrics.columns if k not in used and not k.startswith(NON_RESULT_PREFIXES)
                    and k not in config and k not in axes and k not in frame)
    results |= {k: metrics[k].astype(float) for k in extras}
    meta_cols = {
        "tracking_run_id": info["run_id"],
        "run_name": info["run_name"],
        "parent_run_id": tag(schema.PARENT_RUN_ID),
        "start_time": pd.to_datetime(info["start_time"], unit="ms", utc=True),
        "end_time": pd.to_datetime(info["end_time"], unit="ms", utc=True),
    }
    frame["role"] = _roles(config, info.index)
    config = {k: v for k, v in config.items() if k not in axes and k not in frame}
    runs = pd.concat([frame, pd.DataFrame(axes, index=info.index), pd.DataFrame(results, index=info.index),
                      pd.DataFrame(config, index=info.index), pd.DataFrame(meta_cols, index=info.index)],
                     axis=1)
    runs, dropped = _dedupe(runs)
    runs = _order(runs, axis_names, specs)
    runs["cell"] = _unique_cell_names(runs)
    baselines = {name: (specs[name]["baseline"] if name in specs else _first_value(runs[name]))
                 for name in axis_names}
    available = [m for m in [*REPORT_METRICS, *extras] if m in runs and runs[m].notna().any()]
    runs.attrs = {
        "axes": axis_names,
        "axis_baselines": baselines,
        "metrics": [*REPORT_METRICS, *[m for m in extras if m in available]],
        "grid": meta["grid"],
        "paper_setting": meta["paper_setting"],
        "margin": None if pd.isna(meta["margin"]) else float(meta["margin"]),
        "grid_file": meta["grid_file"],
        "grid_options": meta["grid_options"],
        "experiment": experiment_name,
        "experiment_id": str(experiment_id),
        "parent_run_id": meta["parent_run_id"],
        "duplicates_dropped": dropped,
    }
    return runs


def _status(tagged: pd.Series, run_status: pd.Series) -> pd.Series:
    """Each run's :class:`CellState` value: its ``status`` tag, else (tag missing, empty or not
    a state) the state its MLflow run status implies. A run whose tag still says pending or
    running but that MLflow ended as failed or killed died without saying so: failed."""
    implied = run_status.map(lambda s: state_of_run_status(s).value)
    status = tagged.where(tagged.isin([state.value for state in CellState]), implied)
    died = status.isin([CellState.PENDING.value, CellState.RUNNING.value]) & implied.eq(CellState.FAILED.value)
    return status.mask(died, CellState.FAILED.value).astype(str)


def _dedupe(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One run per (cell_id, seed): the newest finished one, else the newest."""
    ranked = runs.assign(_done=runs["status"].eq(CellState.DONE.value)).sort_values(
        ["_done", "start_time"], ascending=[False, False], kind="stable")
    kept = ranked.drop_duplicates(["cell_id", "seed"], keep="first").drop(columns="_done")
    return kept, len(runs) - len(kept)


def _order(runs: pd.DataFrame, axis_names: list[str], specs: dict[str, dict]) -> pd.DataFrame:
    """Rows in grid order: axis by axis, values in the grid's order, then seed."""
    keys = []
    for name in axis_names:
        order = {schema.encode_param(v): i for i, v in enumerate(specs[name]["values"])} if name in specs else {}
        keys.append(runs[name].map(lambda v, o=order: o.get(schema.encode_param(v) if v is not None else "", len(o)))
                    .rename(f"_k{len(keys)}"))
    ordered = pd.concat([runs, *keys], axis=1) if keys else runs
    sort_by = [k.name for k in keys] + ["cell_id", "seed"]
    ordered = ordered.sort_values(sort_by, kind="stable")
    return ordered.drop(columns=[k.name for k in keys]).reset_index(drop=True)


def _unique_cell_names(runs: pd.DataFrame) -> pd.Series:
    """Cell names, with the cell id appended where two cells share a name (e.g. the grid's
    fixed settings changed between two ``ablate`` invocations)."""
    per_cell = runs.drop_duplicates("cell_id").set_index("cell_id")["cell"]
    clash = per_cell[per_cell.duplicated(keep=False)]
    if clash.empty:
        return runs["cell"]
    renamed = per_cell.where(~per_cell.index.isin(clash.index), per_cell + " [" + per_cell.index.str[:6] + "]")
    return runs["cell_id"].map(renamed)


def _first_value(column: pd.Series) -> Any:
    values = column.dropna()
    return values.iloc[0] if len(values) else None


# --- curves ----------------------------------------------------------------------------------

def _records(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``: parsed in one call (several times faster than line by
    line), or by :func:`read_jsonl` when a line is torn (it skips that line)."""
    text = path.read_text()
    try:
        return json.loads("[" + ",".join(line for line in text.splitlines() if line.strip()) + "]")
    except ValueError:
        return read_jsonl(path)


Points = tuple[np.ndarray, np.ndarray]  # a run's loss curve: steps (int64, ascending), losses (float64)


def _curve(by_step: Mapping[int, float]) -> Points:
    """A curve from ``{step: loss}`` (any order)."""
    steps = np.fromiter(by_step.keys(), np.int64, len(by_step))
    losses = np.fromiter(by_step.values(), np.float64, len(by_step))
    order = np.argsort(steps, kind="stable")
    return steps[order], losses[order]


def _points_from_file(run_dir: Any) -> Points | None:
    """A run's loss curve from ``<run_dir>/metrics.jsonl`` (the last value of a step wins, as in
    MLflow), or None when the file cannot be read here."""
    if not isinstance(run_dir, str) or not run_dir:
        return None
    path = Path(run_dir) / METRICS_FILE
    try:
        if not path.is_file():
            return None
        records = _records(path)
    except OSError:  # permissions, a stale network mount
        return None
    key = schema.LOSS_KEY
    return _curve({int(r["step"]): float(loss) for r in records if isinstance(r, dict)
                   and (loss := r.get(key)) is not None and r.get("step") is not None})


def _points_from_mlflow(uri: str, run_ids: list[str]) -> dict[str, Points]:
    """Loss curves from ``MlflowClient.get_metric_history``: one request per run, from several
    threads over HTTP (the server answers them in parallel), one by one on a local store (its
    reads gain nothing from threads)."""
    mlflow_client = client(uri)

    def one(run_id: str) -> Points:
        history = sorted(mlflow_client.get_metric_history(run_id, schema.LOSS_KEY), key=lambda m: (m.step, m.timestamp))
        return _curve({m.step: m.value for m in history})

    if not is_http(uri) or len(run_ids) <= 1:
        return {run_id: one(run_id) for run_id in run_ids}
    with ThreadPoolExecutor(min(HTTP_THREADS, len(run_ids))) as pool:
        return dict(zip(run_ids, pool.map(one, run_ids)))


def sample_indices(n: int, max_points: int | None) -> np.ndarray:
    """Indices of at most ``max_points`` (+1) evenly spaced points of ``n``, first and last kept."""
    if not max_points or n <= max_points:
        return np.arange(n)
    stride = -(-n // max_points)
    kept = np.arange(0, n, stride)
    return kept if kept[-1] == n - 1 else np.append(kept, n - 1)


def load_curves(uri: str, runs: pd.DataFrame, raw: RawRuns, *, max_points: int | None = 1000,
                run_folders: bool = True) -> pd.DataFrame:
    """Long-form ``train/loss`` of the runs in ``runs`` (the report's ``curves`` frame).

    A run's curve comes from the ``metrics.jsonl`` in its folder (its ``run_dir`` tag in
    ``raw``) when this machine can read it, else from MLflow; a run that has logged no loss to
    MLflow (a pending cell) costs no request. ``run_folders=False``: every curve from MLflow.
    """
    run_dirs = raw.tags[schema.RUN_DIR] if run_folders and schema.RUN_DIR in raw.tags else pd.Series(dtype=object)
    logged = raw.metrics[schema.LOSS_KEY].notna() if schema.LOSS_KEY in raw.metrics else pd.Series(dtype=bool)
    by_run: dict[str, Points] = {}
    missing = []
    for run_id in runs["tracking_run_id"]:
        points = _points_from_file(run_dirs.get(run_id))
        if points is not None:
            by_run[run_id] = points
        elif logged.get(run_id, False):
            missing.append(run_id)
    if missing:
        log.debug("%d of %d runs have no readable run folder: loss curves from MLflow", len(missing), len(runs))
        by_run |= _points_from_mlflow(uri, missing)
    rows, steps, losses = [], [], []
    for position, run_id in enumerate(runs["tracking_run_id"]):
        if run_id not in by_run:
            continue
        run_steps, run_losses = by_run[run_id]
        kept = sample_indices(len(run_steps), max_points)
        rows.append(np.full(len(kept), position))
        steps.append(run_steps[kept])
        losses.append(run_losses[kept])
    if not rows:
        return pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in zip(
            CURVE_COLUMNS, [runs["cell_id"].dtype, runs["cell"].dtype, np.int64, str, np.int64, np.float64])})
    row = np.concatenate(rows)
    target = runs["model.target"].astype(str) if "model.target" in runs else pd.Series("loss", index=runs.index)
    return pd.DataFrame({
        "cell_id": runs["cell_id"].to_numpy()[row], "cell": runs["cell"].to_numpy()[row],
        "seed": runs["seed"].to_numpy()[row], "target": target.to_numpy()[row],
        "step": np.concatenate(steps), "loss": np.concatenate(losses)})


# --- entry point -----------------------------------------------------------------------------

def load_runs(uri: str, grid_or_experiment: str, *, curve_points: int | None = 1000,
              run_folders: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, curves)`` of a grid (experiment name or id) in the store at ``uri``.

    Raises :class:`~harness.tracking.TrackingError` when the store is unreachable or has no
    such experiment (the message lists the experiments that exist). Run folders readable here
    give their runs' state, results and loss curves (:func:`overlay_run_folders`);
    ``run_folders=False`` reads everything from MLflow.
    """
    check_store(uri, must_exist=True)
    experiment = find_experiment(uri, grid_or_experiment)
    raw = read_runs(uri, experiment.experiment_id)
    if run_folders:
        overlay_run_folders(raw)
    runs = assemble(raw, experiment.name, experiment.experiment_id)
    return runs, load_curves(uri, runs, raw, max_points=curve_points, run_folders=run_folders)


def _roles(config: dict[str, Any], index: pd.Index) -> pd.Series:
    """Each run's role from its config columns: the teacher reference, the random-init reference
    (0 epochs of pretraining), or a grid cell. Runs logged before a field existed read as its default."""
    encoder = config.get("eval.encoder", pd.Series("student", index=index)).fillna("student")
    epochs = config.get("pretrain.epochs", pd.Series(np.nan, index=index))
    return pd.Series(np.select([encoder.eq("teacher"), epochs.eq(0)], [schema.TEACHER, schema.RANDOM_INIT],
                               default=schema.CELL_ROLE), index=index)
