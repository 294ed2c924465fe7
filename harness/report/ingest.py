"""Read a grid's runs from MLflow into the frames :func:`harness.report.build_report` takes.

``load_runs(uri, grid_or_experiment) -> (runs, curves)``:

* ``runs``: one row per cell x seed (the child runs, tag ``role=cell``, of the grid's
  experiment) with ``cell_id``, ``cell``, ``seed``, ``status``, ``failure_reason``, one column
  per config field (params typed back: numbers, bools, None; lists stay text), one per axis
  (typed like the grid's values), the report metrics (``linear_top1``, ``knn_top1``,
  ``finetune_top1``, ``final_loss``, ``images_per_s``, ``peak_memory_mb``, ``gpu_hours`` =
  the ``device_hours`` metric) plus any other top-level metric (``linear_top5``, ...), and
  ``mlflow_run_id``, ``run_name``, ``parent_run_id``, ``start_time``, ``end_time``.
  ``runs.attrs`` holds ``axes``, ``axis_baselines`` and ``paper_setting`` from the newest parent
  run's ``grid.axes`` / ``grid.paper_setting`` tags, ``grid``, ``metrics``, ``experiment_id``,
  ``parent_run_id`` (the newest ``ablate`` run, where the report is logged) and
  ``duplicates_dropped``.
  Failed, preempted, running and pending cells are rows like the others. A cell x seed run
  by several ``ablate`` invocations counts once: its newest finished run, else its newest run.
* ``curves``: ``train/loss`` per run (``cell_id``, ``cell``, ``seed``, ``target``, ``step``,
  ``loss``), at most ``curve_points`` evenly spaced points per run.

Speed (1,000 runs, 55 params, ~20 tags, 100 loss points each): a SQLite store is read with
five read-only SQL queries on MLflow's tables (runs, tags, params, latest_metrics, metrics:
about 0.5 s on a busy 2-core machine), where MLflow's paginated search takes about 5 s there
and one ``get_metric_history`` per run about 11 ms a run. An HTTP store is read with MLflow's
search (paginated, 1,000 runs a page) and the server's bulk metric-history endpoint (100 runs
a request, sampled server-side to ``curve_points``). Should a fast path fail (a future
schema), MLflow's own per-run calls are used instead; ``fast=False`` forces them.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from harness.tracking import schema as S
from harness.tracking.store import check_store, client, find_experiment, is_http, sqlite_path

log = logging.getLogger(__name__)

REPORT_METRICS = list(S.REPORT_METRICS)
CURVE_COLUMNS = ["cell_id", "cell", "seed", "target", "step", "loss"]
META_COLUMNS = ["mlflow_run_id", "run_name", "parent_run_id", "start_time", "end_time"]
# metric key prefixes that are histories or monitoring, not results
NON_RESULT_PREFIXES = ("train/", "system/")
MAX_BULK_RUNS = 100  # the server's limit per bulk metric-history request
MAX_BULK_POINTS = 2500  # ... and per run


@dataclass
class RawRuns:
    """Runs of one experiment in long form, as read from the store."""

    info: pd.DataFrame  # run_id, run_name, mlflow_status, start_time, end_time (ms)
    tags: pd.DataFrame  # run_id, key, value
    params: pd.DataFrame  # run_id, key, value
    metrics: pd.DataFrame  # run_id, key, value (latest value per key)


# --- reading ---------------------------------------------------------------------------------

def _connect_ro(path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


def read_sqlite(uri: str, experiment_id: str) -> RawRuns:
    """All active runs of an experiment straight from a SQLite store's tables."""
    path = sqlite_path(uri)
    active = "SELECT run_uuid FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active'"
    with contextlib.closing(_connect_ro(path)) as db:
        def frame(sql: str, columns: list[str]) -> pd.DataFrame:
            return pd.DataFrame(db.execute(sql, (int(experiment_id),)).fetchall(), columns=columns)

        info = frame("SELECT run_uuid, name, status, start_time, end_time FROM runs "
                     "WHERE experiment_id = ? AND lifecycle_stage = 'active'",
                     ["run_id", "run_name", "mlflow_status", "start_time", "end_time"])
        tags = frame(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({active})",
                     ["run_id", "key", "value"])
        params = frame(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({active})",
                       ["run_id", "key", "value"])
        metrics = frame("SELECT run_uuid, key, CASE WHEN is_nan THEN NULL ELSE value END "
                        f"FROM latest_metrics WHERE run_uuid IN ({active})", ["run_id", "key", "value"])
    metrics["value"] = metrics["value"].astype(float)
    return RawRuns(info, tags, params, metrics)


def search_all_runs(uri: str, experiment_id: str, filter_string: str = "") -> list[Any]:
    """Every active run of an experiment: ``MlflowClient.search_runs`` page after page (as
    ``mlflow.search_runs`` does, which stops nowhere but uses the global tracking URI; a
    single ``MlflowClient.search_runs`` call stops at 1,000)."""
    mlflow_client = client(uri)
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def read_mlflow(uri: str, experiment_id: str) -> RawRuns:
    """All active runs of an experiment through MLflow's search API (paginated)."""
    info, tags, params, metrics = [], [], [], []
    for run in search_all_runs(uri, experiment_id):
        run_id = run.info.run_id
        info.append((run_id, run.info.run_name, run.info.status, run.info.start_time, run.info.end_time))
        tags.extend((run_id, k, v) for k, v in run.data.tags.items())
        params.extend((run_id, k, v) for k, v in run.data.params.items())
        metrics.extend((run_id, k, v) for k, v in run.data.metrics.items())
    return RawRuns(
        pd.DataFrame(info, columns=["run_id", "run_name", "mlflow_status", "start_time", "end_time"]),
        pd.DataFrame(tags, columns=["run_id", "key", "value"]),
        pd.DataFrame(params, columns=["run_id", "key", "value"]),
        pd.DataFrame(metrics, columns=["run_id", "key", "value"]).astype({"value": float}),
    )


def read_runs(uri: str, experiment_id: str, *, fast: bool = True) -> RawRuns:
    """The experiment's runs: SQL for SQLite stores when ``fast``, else MLflow's API."""
    if fast and sqlite_path(uri) is not None:
        try:
            return read_sqlite(uri, experiment_id)
        except (sqlite3.Error, ValueError) as err:  # a future schema: MLflow's API still works
            log.warning("reading %s with SQL failed (%s); using MLflow's API", uri, err)
    return read_mlflow(uri, experiment_id)


# --- assembling the runs frame ---------------------------------------------------------------

def _wide(long: pd.DataFrame, index: pd.Index) -> pd.DataFrame:
    """run_id x key table of values (object), rows in ``index`` order."""
    if long.empty:
        return pd.DataFrame(index=index)
    wide = long.drop_duplicates(["run_id", "key"], keep="last").pivot(index="run_id", columns="key", values="value")
    wide.columns.name = None
    return wide.reindex(index)


def _typed(values: Iterable[Any]) -> pd.Series:
    """A column of decoded values with an inferred dtype (numbers, bools, text)."""
    decoded = [S.decode_param(v) if isinstance(v, str) else None for v in values]
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
    parents = info[tags.get(S.ROLE, pd.Series(index=info.index, dtype=object)).eq(S.ROLE_PARENT)]
    if parents.empty:
        return {"grid": experiment_name, "axes_spec": [], "paper_setting": False, "parent_run_id": None}
    newest = parents.sort_values("start_time", ascending=False).index[0]
    row = tags.loc[newest]
    return {
        "grid": row.get(S.GRID) if isinstance(row.get(S.GRID), str) else experiment_name,
        "axes_spec": S.parse_axes(row.get(S.GRID_AXES) if isinstance(row.get(S.GRID_AXES), str) else None),
        "paper_setting": str(row.get(S.GRID_PAPER_SETTING, "false")).lower() == "true",
        "parent_run_id": newest,
    }


def _axis_column(text: pd.Series, spec: dict[str, Any] | None) -> pd.Series:
    """Axis tag text -> the grid's typed values (unknown text decoded like a param)."""
    if spec is None:
        return _typed(text.tolist())
    by_text = {S.encode_param(v): v for v in spec["values"]}
    values = [by_text.get(t, S.decode_param(t)) if isinstance(t, str) else None for t in text]
    return pd.Series(values, dtype=object).infer_objects()


def assemble(raw: RawRuns, experiment_name: str, experiment_id: str) -> pd.DataFrame:
    """The report's ``runs`` frame from the raw runs (see the module docstring)."""
    info = raw.info.set_index("run_id", drop=False)
    tags = _wide(raw.tags, info.index)
    meta = _parent_metadata(info, tags, experiment_name)
    is_cell = tags[S.ROLE].eq(S.ROLE_CELL).to_numpy() if S.ROLE in tags else np.zeros(len(info), bool)
    info, tags = info[is_cell], tags[is_cell]
    params = _wide(raw.params, info.index)
    metrics = _wide(raw.metrics, info.index)

    def tag(name: str) -> pd.Series:
        return tags[name] if name in tags else pd.Series(np.nan, index=info.index, dtype=object)

    # identity and status
    frame = pd.DataFrame(index=info.index)
    frame["cell_id"] = tag(S.CELL_ID).fillna(tag(S.CONFIG_RUN_ID)).fillna(info["run_id"]).astype(str)
    seed_text = tag(S.SEED).fillna(params["seed"] if "seed" in params else np.nan)
    frame["seed"] = pd.to_numeric(seed_text, errors="coerce").fillna(0).astype(int)
    frame["cell"] = tag(S.CELL).fillna(info["run_name"]).fillna(frame["cell_id"]).astype(str)
    from_mlflow = info["mlflow_status"].map(S.FROM_MLFLOW_STATUS).fillna("running")
    status = tag(S.STATUS).where(lambda s: s.notna() & (s != ""), from_mlflow)
    # a job that died without saying so: MLflow ended the run as failed/killed
    died = status.isin(["pending", "running"]) & info["mlflow_status"].isin(["FAILED", "KILLED"])
    frame["status"] = status.mask(died, "failed").astype(str)
    reason = tag(S.FAILURE_REASON).replace("", np.nan)
    frame["failure_reason"] = reason.where(frame["status"] != "done").astype("str")
    # config columns (params), typed back
    config = {key: _typed(params[key].tolist()).set_axis(info.index) for key in params.columns}
    # axis columns: the grid's order and typed values
    specs = {a["name"]: a for a in meta["axes_spec"]}
    axis_names = list(specs) or sorted(k[len(S.AXIS_PREFIX):] for k in tags.columns if k.startswith(S.AXIS_PREFIX))
    axes = {}
    for name in axis_names:
        text = tag(S.AXIS_PREFIX + name)
        if text.isna().all() and name in params:
            text = params[name]
        axes[name] = _axis_column(text, specs.get(name)).set_axis(info.index)
    # metrics
    results = {}
    for column, keys in S.REPORT_METRICS.items():
        values = pd.Series(np.nan, index=info.index)
        for key in keys:
            if key in metrics:
                values = values.fillna(metrics[key].astype(float))
        results[column] = values
    used = {k for keys in S.REPORT_METRICS.values() for k in keys}
    extras = sorted(k for k in metrics.columns if k not in used and not k.startswith(NON_RESULT_PREFIXES)
                    and k not in config and k not in axes and k not in frame)
    results |= {k: metrics[k].astype(float) for k in extras}
    meta_cols = {
        "mlflow_run_id": info["run_id"],
        "run_name": info["run_name"],
        "parent_run_id": tag(S.PARENT_RUN_ID),
        "start_time": pd.to_datetime(info["start_time"], unit="ms", utc=True),
        "end_time": pd.to_datetime(info["end_time"], unit="ms", utc=True),
    }
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
        "experiment": experiment_name,
        "experiment_id": str(experiment_id),
        "parent_run_id": meta["parent_run_id"],
        "duplicates_dropped": dropped,
    }
    return runs


def _dedupe(runs: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One run per (cell_id, seed): the newest finished one, else the newest."""
    ranked = runs.assign(_done=runs["status"].eq("done")).sort_values(
        ["_done", "start_time"], ascending=[False, False], kind="stable")
    kept = ranked.drop_duplicates(["cell_id", "seed"], keep="first").drop(columns="_done")
    return kept, len(runs) - len(kept)


def _order(runs: pd.DataFrame, axis_names: list[str], specs: dict[str, dict]) -> pd.DataFrame:
    """Rows in grid order: axis by axis, values in the grid's order, then seed."""
    keys = []
    for name in axis_names:
        order = {S.encode_param(v): i for i, v in enumerate(specs[name]["values"])} if name in specs else {}
        keys.append(runs[name].map(lambda v, o=order: o.get(S.encode_param(v) if v is not None else "", len(o)))
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

def _curves_sqlite(uri: str, experiment_id: str, run_ids: set[str]) -> pd.DataFrame:
    with contextlib.closing(_connect_ro(sqlite_path(uri))) as db:
        rows = db.execute(
            "SELECT run_uuid, step, timestamp, CASE WHEN is_nan THEN NULL ELSE value END FROM metrics "
            "WHERE key = ? AND run_uuid IN (SELECT run_uuid FROM runs WHERE experiment_id = ? "
            "AND lifecycle_stage = 'active') ORDER BY run_uuid, step, timestamp",
            (S.LOSS_KEY, int(experiment_id))).fetchall()
    points = pd.DataFrame(rows, columns=["run_id", "step", "timestamp", "loss"])
    return points[points["run_id"].isin(run_ids)]


def _curves_http_bulk(uri: str, run_ids: list[str], max_points: int) -> pd.DataFrame:
    """The server's bulk, server-sampled metric history: 100 runs a request."""
    from mlflow.utils.rest_utils import http_request

    creds = client(uri)._tracking_client.store.get_host_creds()
    frames = []
    for start in range(0, len(run_ids), MAX_BULK_RUNS):
        batch = run_ids[start:start + MAX_BULK_RUNS]
        resp = http_request(creds, "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", "GET",
                            params={"run_ids": batch, "metric_key": S.LOSS_KEY,
                                    "max_results": min(max_points, MAX_BULK_POINTS)},
                            max_retries=1, timeout=60)
        if resp.status_code != 200:
            raise RuntimeError(f"bulk metric history: HTTP {resp.status_code}")
        metrics = resp.json().get("metrics", [])
        frames.append(pd.DataFrame([(m["run_id"], int(m.get("step", 0)), int(m.get("timestamp", 0)),
                                     float(m["value"])) for m in metrics],
                                   columns=["run_id", "step", "timestamp", "loss"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["run_id", "step", "timestamp", "loss"])


def _curves_per_run(uri: str, run_ids: list[str]) -> pd.DataFrame:
    """MLflow's per-run history (about 11 ms a run on SQLite; threads hide HTTP latency)."""
    from concurrent.futures import ThreadPoolExecutor

    mlflow_client = client(uri)

    def one(run_id: str) -> list[tuple]:
        return [(run_id, m.step, m.timestamp, m.value) for m in mlflow_client.get_metric_history(run_id, S.LOSS_KEY)]

    workers = 8 if is_http(uri) else 1
    with ThreadPoolExecutor(workers) as pool:
        rows = [row for rows in pool.map(one, run_ids) for row in rows]
    return pd.DataFrame(rows, columns=["run_id", "step", "timestamp", "loss"])


def downsample(points: pd.DataFrame, max_points: int | None) -> pd.DataFrame:
    """At most ``max_points`` evenly spaced points per run, first and last kept."""
    if not max_points or points.empty:
        return points
    position = points.groupby("run_id", sort=False).cumcount()
    size = points.groupby("run_id", sort=False)["step"].transform("size")
    stride = np.ceil(size / max_points).astype(int).clip(lower=1)
    keep = (position % stride == 0) | (position == size - 1)
    return points[keep.to_numpy()]


def load_curves(uri: str, runs: pd.DataFrame, *, max_points: int | None = 1000, fast: bool = True) -> pd.DataFrame:
    """Long-form ``train/loss`` of the runs in ``runs`` (the report's ``curves`` frame)."""
    run_ids = runs["mlflow_run_id"].tolist()
    points, sorted_ = None, False
    if run_ids and fast:
        try:
            if sqlite_path(uri) is not None:
                points = _curves_sqlite(uri, runs.attrs["experiment_id"], set(run_ids))
                sorted_ = True
            elif is_http(uri):
                points = _curves_http_bulk(uri, run_ids, max_points or MAX_BULK_POINTS)
        except Exception as err:  # noqa: BLE001 - the per-run path below is always correct
            log.warning("bulk loss-curve read failed (%s); reading run by run", err)
            points, sorted_ = None, False
    if points is None:
        points = _curves_per_run(uri, run_ids) if run_ids else pd.DataFrame(
            columns=["run_id", "step", "timestamp", "loss"])
    if not sorted_:
        points = points.sort_values(["run_id", "step", "timestamp"], kind="stable")
    points = points[~points.duplicated(["run_id", "step"], keep="last").to_numpy()]
    points = downsample(points, max_points)
    target = runs["model.target"] if "model.target" in runs else pd.Series("loss", index=runs.index)
    keys = runs[["mlflow_run_id", "cell_id", "cell", "seed"]].assign(target=target.astype(str))
    curves = points.merge(keys, left_on="run_id", right_on="mlflow_run_id", how="inner")
    curves = curves.astype({"step": int, "loss": float})
    return curves[CURVE_COLUMNS].reset_index(drop=True)


# --- entry point -----------------------------------------------------------------------------

def load_runs(uri: str, grid_or_experiment: str, *, curve_points: int | None = 1000,
              fast: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(runs, curves)`` of a grid (experiment name or id) in the store at ``uri``.

    Raises :class:`~harness.tracking.TrackingError` when the store is unreachable or has no
    such experiment (the message lists the experiments that exist). ``fast=False`` reads only
    through MLflow's public API (used to check the fast paths).
    """
    check_store(uri, must_exist=True)
    experiment = find_experiment(uri, grid_or_experiment)
    raw = read_runs(uri, experiment.experiment_id, fast=fast)
    runs = assemble(raw, experiment.name, experiment.experiment_id)
    curves = load_curves(uri, runs, max_points=curve_points, fast=fast)
    return runs, curves
