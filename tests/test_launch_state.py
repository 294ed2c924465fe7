"""Cell state from run folders + scheduler state (pure), idempotence decisions, records, views."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from harness.grid import Resources, build_grid
from harness.launch import display
from harness.launch.executors import local_slots
from harness.launch.records import LAUNCH_FILE, GridRecord, LaunchRecord, Submission, read_record, write_record
from harness.launch.slurm import SlurmJobState
from harness.run.cell_state import CellState
from harness.launch.cell_views import CellView, collect, derive, local_job_state, plan_action, tail


def sub(job_id: str = "12_3", executor: str = "slurm") -> Submission:
    return Submission(job_id=job_id, executor=executor, host=socket.gethostname(), submitted_at=time.time())


def job(state: str, reason: str = "", restarts: int = 0) -> SlurmJobState:
    return SlurmJobState("12_3", state, reason, restarts)


RUNNING = {"state": "running", "attempts": 1}
REQUEUED = {"state": "requeued", "attempts": 1, "reason": "stopped by the scheduler (SIGTERM)"}
FAILED = {"state": "failed", "attempts": 1, "reason": "loss became nan at step 3: lower pretrain.base_lr"}


@pytest.mark.parametrize(("status", "finished", "submission", "slurm", "expected", "reason"), [
    ({}, False, None, None, "missing", None),
    ({}, True, None, None, "done", None),  # results.json wins
    ({"state": "done"}, False, sub(), job("COMPLETING"), "done", None),
    ({}, False, sub(), job("PENDING", "Priority"), "pending", "Priority"),
    (FAILED, False, sub(), job("PENDING", "Resources"), "pending", "Resources"),  # resubmitted
    (RUNNING, False, sub(), job("PENDING", "BeginTime", restarts=1), "requeued", "BeginTime"),
    (REQUEUED, False, sub(), job("PENDING", "BeginTime", restarts=1), "requeued", "BeginTime"),
    (RUNNING, False, sub(), job("REQUEUED"), "requeued", None),
    (RUNNING, False, sub(), job("SUSPENDED"), "preempted", None),
    ({}, False, sub(), job("RUNNING"), "running", None),  # started, status not written yet
    (RUNNING, False, sub(), job("RUNNING"), "running", None),
    (REQUEUED, False, sub(), job("COMPLETING"), "requeued", "stopped by the scheduler"),
    (REQUEUED, False, sub(), job("RUNNING", restarts=1), "requeued", "stopped by the scheduler"),  # restarting
    (FAILED, False, sub(), job("COMPLETING"), "failed", FAILED["reason"]),
    (FAILED, False, sub(), None, "failed", FAILED["reason"]),
    (REQUEUED, False, sub("4242", "local"), None, "requeued", "stopped by the scheduler (SIGTERM); not restarted"),
    (REQUEUED, False, sub(), job("CANCELLED"), "failed", "job 12_3 ended CANCELLED before the run finished"),
    (RUNNING, False, sub(), job("CANCELLED"), "failed", "job 12_3 ended CANCELLED before the run finished: see its log"),
    (RUNNING, False, sub(), job("PREEMPTED"), "failed", "job 12_3 ended PREEMPTED"),  # not requeued by Slurm
    (RUNNING, False, sub(), job("OUT_OF_MEMORY"), "failed", "job 12_3 ended OUT_OF_MEMORY"),
    (RUNNING, False, sub(), job("NODE_FAIL"), "failed", "job 12_3 ended NODE_FAIL"),
    ({}, False, sub(), job("FAILED", "NonZeroExitCode"), "failed", "job 12_3 ended FAILED (NonZeroExitCode)"),
    (RUNNING, False, sub(), None, "failed", "job 12_3 is gone and its run never wrote a final status"),
    (RUNNING, False, sub("4242", "local"), None, "failed", "job 4242 is gone"),
])
def test_derive(status, finished, submission, slurm, expected, reason) -> None:
    subs = [submission] if submission else []
    state, why, job_id, alive = derive(status, finished, subs, {"12_3": slurm, "4242": None})
    assert state == CellState(expected)
    assert alive == (slurm is not None and not slurm.finished)
    if reason is None:
        assert why is None
    else:
        assert why is not None and why.startswith(reason), why


def test_every_submission_is_asked_about_not_only_the_newest() -> None:
    """A requeued job that is alive again keeps its cell, though a newer duplicate died: the cell is
    the live job's, and ablate leaves it alone."""
    old, duplicate = sub("12_3"), sub("13_0")
    jobs = {"12_3": job("RUNNING", restarts=1), "13_0": SlurmJobState("13_0", "FAILED", "NonZeroExitCode")}
    state, why, job_id, alive = derive(RUNNING, False, [old, duplicate], jobs)
    assert (state, job_id, alive) == (CellState.RUNNING, "12_3", True)
    assert why == "duplicate job 13_0 exited: job 12_3 holds the run folder"
    view = CellView(Path("x"), None, state, job_id=job_id, job_alive=alive)
    assert plan_action(view, force=False) == "leave"
    done = CellView(Path("x"), None, CellState.DONE, job_alive=True)  # still syncing to MLflow
    assert (plan_action(done, force=False), done.settled) == ("skip", False)


@pytest.mark.parametrize(("state", "alive", "force", "action"), [
    ("missing", False, False, "submit"), ("failed", False, False, "submit"), ("done", False, False, "skip"),
    ("requeued", False, False, "submit"), ("pending", True, False, "leave"), ("running", True, False, "leave"),
    ("requeued", True, False, "leave"), ("preempted", True, False, "leave"), ("failed", True, False, "leave"),
    ("done", False, True, "restart"), ("running", True, True, "restart"),
])
def test_plan(state: str, alive: bool, force: bool, action: str) -> None:
    assert plan_action(CellView(Path("x"), None, CellState(state), job_alive=alive), force) == action


def test_cell_state_maps_to_mlflow() -> None:
    from harness.tracking.runs import RUN_STATUS, state_of_run_status

    assert {s: RUN_STATUS[s] for s in CellState} == {
        CellState.MISSING: "RUNNING", CellState.PENDING: "RUNNING", CellState.RUNNING: "RUNNING",
        CellState.REQUEUED: "RUNNING", CellState.PREEMPTED: "RUNNING", CellState.DONE: "FINISHED",
        CellState.FAILED: "FAILED"}
    assert state_of_run_status("KILLED") == CellState.FAILED and CellState.parse("bogus") is None


def test_local_slots_never_oversubscribe() -> None:
    assert local_slots(Resources(cpus_per_task=1), cores=2) == (2, 1)
    assert local_slots(Resources(cpus_per_task=2), cores=2) == (1, 2)
    assert local_slots(Resources(cpus_per_task=4), cores=2) == (1, 2)
    assert local_slots(Resources(tasks_per_node=2), cores=2) == (1, 1)
    assert local_slots(Resources(cpus_per_task=2), cores=16) == (8, 2)


def test_resources_tasks() -> None:
    assert (Resources().tasks, Resources(gpus_per_node=8).tasks, Resources(tasks_per_node=2).tasks) == (1, 8, 2)
    assert Resources(nodes=2, gpus_per_node=4).world_size == 8
    assert Resources(gpus_per_node=8, cpus_per_task=10, mem_gb=480, time_min=1440).summary() == \
        "1x8 GPU, 10 cpu/task, 480 GB, 1440 min"


def test_local_job_state_of_this_process_and_a_dead_pid() -> None:
    # this (pytest) process stands in for the ablate process that queues local cells
    queued = local_job_state(sub(f"queued:{os.getpid()}", "local"))
    assert queued is not None and (queued.state, queued.reason) == ("PENDING", "waiting for a free local slot")
    assert local_job_state(sub(str(os.getpid()), "local")) is None  # alive, but not a submitit job
    assert local_job_state(sub("999999999", "local")) is None


def test_records_round_trip_and_bad_files(tmp_path: Path) -> None:
    record = LaunchRecord(grid="g", name="target=clip", run_id="r", cell_id="c", seed=0,
                          axes={"model.target": "clip"}, submissions=[sub()])
    write_record(tmp_path / "a" / LAUNCH_FILE, record)
    assert read_record(tmp_path / "a" / LAUNCH_FILE, LaunchRecord) == record
    assert read_record(tmp_path / "missing.json", LaunchRecord) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_record(tmp_path / "bad.json", GridRecord) is None


def make_cell_dir(root: Path, name: str, *, status: dict | None = None, results: dict | None = None,
                  submission: Submission | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    if status is not None:
        (folder / "status.json").write_text(json.dumps(status))
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    if submission is not None:
        record = LaunchRecord(grid="g", name=name, run_id=name, cell_id=name, seed=0, axes={},
                              submissions=[submission])
        write_record(folder / LAUNCH_FILE, record)
    return folder


def test_idempotence_decisions_from_folders(tmp_path: Path) -> None:
    """Done cells are skipped, failed and missing ones (re)submitted; a job Slurm no longer
    knows with a run that says running counts as failed (it died without a final status)."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    (log_dir / "9_0_0_log.err").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    dead = sub("999999990_0")
    dead = dead.model_copy(update={"log_dir": str(log_dir)})
    dirs = [
        make_cell_dir(tmp_path, "done", status={"state": "done", "attempts": 1},
                      results={"metrics": {"linear_top1": 42.0}}, submission=sub("999999991_0")),
        make_cell_dir(tmp_path, "failed", status=FAILED, submission=sub("999999992_0")),
        make_cell_dir(tmp_path, "vanished", status=RUNNING, submission=dead),
        tmp_path / "missing",
    ]
    found = collect(dirs)
    assert [v.state.value for v in found] == ["done", "failed", "failed", "missing"]
    assert [plan_action(v, force=False) for v in found] == ["skip", "submit", "submit", "submit"]
    assert [plan_action(v, force=True) for v in found] == ["restart"] * 4
    table = display.status_table(found)
    assert "linear_top1=42" in table and "loss became nan" in table
    details = display.failure_details(found)
    assert "FAILED vanished seed=0: job 999999990_0 is gone" in details
    assert "| RuntimeError: CUDA out of memory" in details
    assert display.counts(found) == "1 missing, 1 done, 2 failed"


def test_tail_reads_the_end_of_large_files(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail(path, 3) == ["line 99997", "line 99998", "line 99999"]


def test_plan_table_shows_cells_estimates_and_status(tmp_path: Path) -> None:
    grid = build_grid({"name": "g", "base": {"model": {"size": "vit_base_patch16"}, "pretrain": {"epochs": 400},
                                             "data": {"root": str(tmp_path / "nowhere")}},
                       "axes": {"model.decoder": ["standard", "prompting"]},
                       "resources": {"gpus_per_node": 8}, "estimate": {"train_images": 1281167},
                       "teacher_reference": False})
    found = collect([tmp_path / c.folder for c in grid.cells])
    reference = grid.cells[2]
    assert reference.is_random_init  # the grid's random-init reference comes after its cells
    hours = {grid.cells[0].run_id: 332.5, grid.cells[1].run_id: None, reference.run_id: 0.0}
    text = display.plan_table(grid, found, hours, ["submit", "submit", "submit"], {0: 1, 1: 1, 2: 2})
    lines = text.splitlines()
    assert lines[0].split() == ["#", "cell", "seed", "run", "id", "resources", "GPU-h", "status", "ablate", "would",
                                "job"]
    assert "decoder=standard" in lines[2] and "1x8 GPU, 1 cpu/task, 60 min" in lines[2] and "332.5" in lines[2]
    assert lines[3].split()[-4:] == ["?", "missing", "submit", "1"]  # both decoders: one group job
    assert "random init" in lines[4] and lines[4].split()[-4:] == ["0.0", "missing", "submit", "2"]
    assert lines[-1].startswith("3 cells; total 332.5 GPU-hours of pretraining (evaluation not included), "
                                "assuming 40 TFLOP/s sustained per GPU")


def test_preflight_once_per_signature_and_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from harness.core.errors import ConfigError
    from harness.launch.preflight import check_configs

    calls: list[str] = []

    def fake_preflight(cfg, **where) -> None:
        calls.append(cfg.run_id())
        if cfg.model.mask_ratio == 0.9:
            raise ConfigError("shapes do not fit")

    monkeypatch.setitem(sys.modules, "harness.run.checks", types.SimpleNamespace(preflight=fake_preflight))
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    grid = build_grid({"name": "g", "base": {"data": {"root": str(data)}}, "seeds": 3,
                       "axes": {"model.mask_ratio": [0.5, 0.75]}})
    check_configs(grid, cache_dir=tmp_path)
    assert len(calls) == 4  # seeds share a signature: two cells, the random-init and the teacher reference
    check_configs(grid, cache_dir=tmp_path)
    assert len(calls) == 4  # remembered
    os.utime(data / "train", ns=(1, 1))  # the tree changed: check again
    check_configs(grid, cache_dir=tmp_path)
    assert len(calls) == 8
    bad = build_grid({"name": "g", "base": {"data": {"root": str(data)}}, "axes": {"model.mask_ratio": [0.5, 0.9]}})
    with pytest.raises(ConfigError, match=r"^cell mask_ratio=0.9: shapes do not fit$"):
        check_configs(bad, cache_dir=tmp_path)
    with pytest.raises(ConfigError):  # failures are not remembered
        check_configs(bad, cache_dir=tmp_path)


def test_rehearsal_keeps_the_grids_structure_and_shrinks_its_compute(tmp_path: Path) -> None:
    """Same cells, axis values, seeds and protocols; GPU tasks become CPU tasks capped at a node's
    CPUs; micro student and teacher, sampled data, separate names; the real grid is left as is."""
    from harness.grid import load_grid
    from harness.grid.rehearsal import rehearse

    data = tmp_path / "imagenet"
    for split, n in (("train", 30), ("val", 10)):
        for label in ("n01", "n02", "n03"):
            (data / split / label).mkdir(parents=True)
            for i in range(n):
                (data / split / label / f"{i}.JPEG").write_bytes(b"")
    grid = load_grid(Path(__file__).resolve().parents[1] / "ablations" / "milan_vitb_in1k.yaml", seeds=2,
                     sets={"data.root": str(data)})
    rehearsal = rehearse(grid, runs_dir=tmp_path / "runs", cpu_only=True, cpus_per_node=4)
    small = rehearsal.grid
    assert small.name == "milan_vitb_in1k-rehearsal" and small.experiment == "milan_vitb_in1k-rehearsal"
    assert [(c.axes, c.seed) for c in small.cells] == [(c.axes, c.seed) for c in grid.cells]
    assert all(c.grid == small.name for c in small.cells)
    assert small.resources.gpus_per_node == 0 and small.resources.world_size == 4  # 8 GPUs -> 4 CPUs
    for big, cell in zip(grid.cells, small.cells):
        cfg = cell.config
        assert cfg.eval.protocols == big.config.eval.protocols == ("linear", "finetune")
        assert (cfg.model.target, cfg.model.decoder, cfg.model.masking, cfg.model.mask_ratio) == \
            (big.config.model.target, big.config.model.decoder, big.config.model.masking, big.config.model.mask_ratio)
        assert (cfg.model.size, cfg.model.img_size, cfg.teacher.model) == ("vit_micro_patch4", 32, "milan-clip-micro")
        assert cfg.eval.linear.batch_size % 4 == 0 and cfg.eval.finetune.batch_size % 4 == 0
        assert cfg.run_id() != big.run_id
    linked = sorted((Path(small.cells[0].config.data.root) / "train").rglob("*.JPEG"))
    assert len(linked) == 3 * 24 and all(p.is_symlink() for p in linked)
    assert any("3 classes" in note for note in rehearsal.notes)


def test_rehearsal_verdict_names_the_first_failed_cell_and_its_stage(tmp_path: Path) -> None:
    record = LaunchRecord(grid="g", name="target=clip", run_id="r", cell_id="c", seed=0, axes={})
    ok = CellView(tmp_path / "a", record, CellState.DONE)
    failed = CellView(tmp_path / "b", record, CellState.FAILED, reason="ValueError: bad batch", stage="finetune")
    assert display.rehearsal_verdict([ok, ok], "g").startswith("rehearsal passed: all 2 cells")
    verdict = display.rehearsal_verdict([ok, failed, failed], "g")
    assert verdict.startswith("rehearsal FAILED: 2 of 3 cells; the first, target=clip seed=0, at stage finetune: "
                              "ValueError: bad batch")
    assert "FAILED target=clip seed=0 at stage finetune: ValueError: bad batch" in display.failure_details([failed])
