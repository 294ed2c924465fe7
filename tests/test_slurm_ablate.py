"""`bench.py ablate` against the real Slurm cluster (``bash scripts/local-slurm.sh start``).

Skipped when Slurm is absent, failed when CI=true (``slurm_cluster`` in conftest.py). No sacct:
states come from the run folders, squeue and scontrol. Every test logs to one MLflow server
that the first ``ablate`` starts over a SQLite store in a shared temporary runs folder (the
default for Slurm), stopped at the end of the module.

For speed the cells are tiny: vit_micro_patch4 at 32 px on a demo dataset of 30 + 10 images per
class, with a milan-clip-micro teacher trained for one epoch (session fixture, in a temporary
folder); the smoke grid is shrunk with ``--set`` overrides to that setup.
"""

from __future__ import annotations

import json
import re
import math
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import micro_config, scontrol_requeue

from harness.launch import slurm
from harness.launch.cell_views import CellView, collect

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 300  # 30 per class x 10 classes


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cwd of every ablate here; its runs/ holds the MLflow store and server (stopped at the end)."""
    path = tmp_path_factory.mktemp("slurm-ablate")
    yield path
    from harness.tracking.server import stop_server

    stop_server(path / "runs" / ".mlflow-server")


def bench(workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "bench.py"), *args], cwd=workdir, capture_output=True,
                          text=True, timeout=timeout, env={**_env(), "PYTHONUNBUFFERED": "1"})


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def cell_dirs(workdir: Path, grid: str) -> list[Path]:
    record = json.loads((workdir / "runs" / grid / "grid.json").read_text())
    return [workdir / "runs" / grid / f for f in record["folders"]]


def poll(what: Callable[[], object], timeout: float, every: float = 1.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := what()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what.__doc__ or what}")
        time.sleep(every)
    return value


def write_grid(workdir: Path, name: str, base: dict, resources: dict, axes: dict | None = None) -> Path:
    path = workdir / f"{name}.yaml"
    # launch-mechanics grids: without the random-init reference (the shipped grids below keep it)
    path.write_text(yaml.safe_dump({"name": name, "base": base, "axes": axes or {}, "resources": resources,
                                    "random_init": False, "teacher_reference": False}))
    return path


def loss_steps(cell: Path) -> list[int]:
    lines = (cell / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def mlflow_loss_steps(uri: str, run_id: str) -> list[int]:
    from harness.tracking.store import client

    return sorted(m.step for m in client(uri).get_metric_history(run_id, "train/loss"))


def store_of(cell: Path):
    from harness.tracking import Store

    return Store(**json.loads((cell / "launch.json").read_text())["store"])


def test_smoke_grid_on_slurm(workdir: Path, demo_assets: tuple[Path, Path]) -> None:
    """The 2x2x2 smoke grid (shrunk to micro cells, one seed) as one job array: all 8 cells and the
    random-init reference finish with their evaluation metrics, in the run folders and in their
    MLflow runs, and the report has a verdict for every effect."""
    data, teacher = demo_assets
    overrides = {"model.size": "vit_micro_patch4", "teacher.model": "milan-clip-micro",
                 "teacher.pretrained": teacher, "data.root": data, "pretrain.batch_size": 32,
                 "eval.linear.epochs": 5, "eval.feature_batch_size": 100, "runtime.num_workers": 0}
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
    sets += ["--seeds", "1"]
    proc = bench(workdir, "ablate", str(REPO / "ablations" / "smoke.yaml"), "--executor", "slurm", "--wait", *sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the 8 cells differ only on the student side: one group job; the two references (neither trains) another
    assert ("submitted 10 cells as 2 job(s) (2 group(s) sharing data and teacher, of 8, 2 cells) in Slurm "
            "job array") in proc.stdout and "grid smoke took" in proc.stdout
    assert "[10 done]" in proc.stdout and (workdir / "reports" / "smoke" / "report.md").is_file()
    # one seed of a complete 2x2x2 factorial: Lenth's pseudo standard error, and it says so
    assert "Lenth" in proc.stdout and "pretrained vs random init" in proc.stdout and "student vs teacher" in proc.stdout

    views = collect(cell_dirs(workdir, "smoke"))
    assert [v.state.value for v in views] == ["done"] * 10
    array_ids = {v.record.last.job_id.split("_")[0] for v in views}
    assert len(array_ids) == 1  # one job array
    trained = [v for v in views if v.record.name not in ("random init", "teacher")]
    assert len({v.record.last.job_id for v in trained}) == 1 and {v.record.last.group_size for v in trained} == {8}
    status = bench(workdir, "status", "smoke")
    assert status.stdout.count("(group of 8)") == 8, status.stdout
    for view in views:
        results = json.loads((view.folder / "results.json").read_text())
        assert {"linear_top1", "knn_top1", "final_loss"} <= results["metrics"].keys()
        assert (view.folder / "logs").is_dir()

    from harness.tracking.read import load_runs

    uri = views[0].record.store.reader_uri()
    assert uri.startswith("http://") and views[0].record.store.backend.startswith("sqlite:///")
    runs, curves = load_runs(uri, "smoke")
    assert len(runs) == 10 and set(runs["status"]) == {"done"} and (runs["role"] == "random_init").sum() == 1
    assert (runs["role"] == "teacher").sum() == 1
    assert runs["linear_top1"].notna().all() and runs["knn_top1"].notna().all()
    assert set(runs["cell"]) == {v.record.name for v in views}
    assert curves["loss"].notna().all() and curves["cell_id"].nunique() == 8  # the reference never trains
    assert sorted(runs["group_size"]) == [2, 2] + [8] * 8 and runs.loc[runs["group_size"] == 8, "job"].nunique() == 1
    report = (workdir / "reports" / "smoke" / "report.md").read_text()
    assert "## Group jobs" in report and "Cells of one seed are paired" in report
    assert re.search(r"\d+ of 10 finished runs trained in group jobs", report)

    # a second ablate finds everything done and submits nothing
    again = bench(workdir, "ablate", str(REPO / "ablations" / "smoke.yaml"), "--executor", "slurm", *sets)
    assert again.returncode == 0 and "10 cells (10 done); 0 to submit" in again.stdout, again.stdout


def long_pixel_cell(demo_assets: tuple[Path, Path], epochs: int, num_workers: int) -> dict:
    """A pixel-target micro cell (no teacher) long enough to interrupt, evaluated by k-NN only."""
    base = micro_config(*demo_assets)
    base["model"] |= {"target": "pixel", "decoder": "standard", "masking": "random"}
    base["pretrain"] |= {"epochs": epochs, "batch_size": 16}
    base["eval"] = {"protocols": ["knn"], "feature_batch_size": 100}
    base["runtime"] = {"num_workers": num_workers, "log_every": 1, "checkpoint_every": 10}
    return base


def test_the_paper_grid_rehearses_end_to_end_on_cpu_tasks(workdir: Path) -> None:
    """`ablate milan_vitb_in1k --rehearse`: the 8 cells of the paper grid at micro scale, each on 2
    CPU tasks (gloo) for the node's 2 CPUs instead of 8 GPUs, the demo data for the ImageNet this
    machine lacks; every cell ends done with both protocols, in its results and in the report's
    paper table, and nothing of it lands in the real grid's folders or experiment."""
    proc = bench(workdir, "ablate", str(REPO / "ablations" / "milan_vitb_in1k.yaml"), "--rehearse",
                 "--executor", "slurm", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "rehearsal: resources: 2 CPU task(s) per node with gloo instead of 8 GPUs" in out
    assert "the grid's /datasets/imagenet is not visible from this machine" in out
    assert "rehearsal passed: all 10 cells ran every stage" in out
    views = collect(cell_dirs(workdir, "milan_vitb_in1k-rehearsal"))
    assert [v.state.value for v in views] == ["done"] * 10  # the 8 cells, the random-init and the teacher reference
    for view in views:
        metrics = json.loads((view.folder / "results.json").read_text())["metrics"]
        assert {"linear_top1", "finetune_top1"} <= metrics.keys()
        logs = sorted(p.name for p in (view.folder / "logs").glob("*_log.out"))
        assert len(logs) == 2  # one per task
    report = (workdir / "reports" / "milan_vitb_in1k-rehearsal" / "report.md").read_text()
    paper = report[report.index("## Reference numbers"):]
    for metric in ("linear_top1", "finetune_top1"):
        row = next(line for line in paper.splitlines() if line.startswith("| MILAN") and f"| {metric} " in line)
        assert re.search(r"\|\s+\d+\.\d+\s+\|\s+1\s+\|", row), row  # measured, over 1 run
    assert not (workdir / "runs" / "milan_vitb_in1k").exists()
    from harness.tracking.store import client

    uri = views[0].record.store.reader_uri()
    assert client(uri).get_experiment_by_name("milan_vitb_in1k") is None
    assert client(uri).get_experiment_by_name("milan_vitb_in1k-rehearsal") is not None


def test_the_ade20k_grid_rehearses_both_segmentation_protocols_on_slurm(workdir: Path) -> None:
    """`ablate milan_vitb_ade20k --rehearse`: the paper grid's 9 cells with seg_upernet and
    seg_linear at micro scale on the demo data's segmentation split (ADE20K is not here), each
    pretraining at micro scale instead of reading its twin's encoder; every cell ends done with
    both mIoUs, and the report's reference rows give 52.7 beside MILAN and 48.1 beside MAE."""
    proc = bench(workdir, "ablate", str(REPO / "ablations" / "milan_vitb_ade20k.yaml"), "--rehearse",
                 "--executor", "slurm", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "rehearsal: weights: each cell pretrains at micro scale instead of reading its finished twin's" in out
    assert "rehearsal: data: eval.seg_upernet.root /datasets/ADEChallengeData2016 is not visible" in out
    assert "rehearsal passed: all 10 cells ran every stage" in out
    views = collect(cell_dirs(workdir, "milan_vitb_ade20k-rehearsal"))
    assert [v.state.value for v in views] == ["done"] * 10
    for view in views:
        metrics = json.loads((view.folder / "results.json").read_text())["metrics"]
        assert {"seg_upernet_miou", "seg_linear_miou", "seg_upernet_pixel_accuracy"} <= metrics.keys()
    report = (workdir / "reports" / "milan_vitb_ade20k-rehearsal" / "report.md").read_text()
    paper = report[report.index("## Reference numbers"):]
    rows = [line for line in paper.splitlines() if "| seg_upernet_miou " in line]
    assert [row.split("|")[1].strip() for row in rows] == ["MILAN", "MAE"]
    assert "52.70" in rows[0] and "48.10" in rows[1] and "finetune_top1" not in paper.split("\n## ")[0]


def test_the_mask_ratio_decoder_grid_rehearses_as_one_group_of_17_students(workdir: Path) -> None:
    """The shipped grid that varies only the student side (mask ratio, decoder depth and width):
    its 17 cells train as one group job on 2 gloo ranks, students of different mask ratios and
    decoder shapes side by side, and every cell ends done with its own evaluation."""
    proc = bench(workdir, "ablate", str(REPO / "ablations" / "mask_ratio_decoder.yaml"), "--rehearse",
                 "--executor", "slurm", timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "as 2 job(s) (2 group(s) sharing data and teacher, of 17, 2 cells)" in proc.stdout
    assert "rehearsal passed: all 19 cells ran every stage" in proc.stdout
    views = collect(cell_dirs(workdir, "mask_ratio_decoder-rehearsal"))
    assert [v.state.value for v in views] == ["done"] * 19
    shapes = set()
    for view in views:
        assert "linear_top1" in json.loads((view.folder / "results.json").read_text())["metrics"]
        if view.record.name not in ("random init", "teacher"):
            model = yaml.safe_load((view.folder / "config.yaml").read_text())["model"]
            shapes.add((model["mask_ratio"], model["decoder_depth"], model["decoder_width"]))
    assert len(shapes) == 17  # 17 distinct students in one job


def test_requeued_cell_resumes_once_however_often_ablate_runs_meanwhile(workdir: Path,
                                                                        demo_assets: tuple[Path, Path]) -> None:
    """`scontrol requeue` kills a running cell (SIGTERM to every process, its DataLoader worker
    included): the run records `requeued`, never `failed`; `ablate` run again and again while the
    job restarts submits nothing; the cell resumes from its last checkpoint and ends done with
    every step exactly once in metrics.jsonl and in its one MLflow run."""
    base = long_pixel_cell(demo_assets, epochs=25, num_workers=1)
    path = write_grid(workdir, "requeue", base, {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10})
    total = math.ceil(25 * (TRAIN_IMAGES // 16))

    start = time.monotonic()
    proc = bench(workdir, "ablate", str(path), "--executor", "slurm")  # returns at once
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "follow with: python bench.py status requeue" in proc.stdout and "ablate took" in proc.stdout
    assert time.monotonic() - start < 90
    [cell] = cell_dirs(workdir, "requeue")
    job_id = json.loads((cell / "launch.json").read_text())["submissions"][-1]["job_id"]

    def checkpointed() -> bool:
        """a checkpoint past step 10"""
        return (cell / "checkpoints" / "latest.pt").is_file() and (cell / "metrics.jsonl").is_file() \
            and max(loss_steps(cell), default=0) >= 12
    poll(checkpointed, timeout=240, every=0.5)
    scontrol_requeue(job_id)

    def stopped() -> bool:
        """status.json to say requeued"""
        return json.loads((cell / "status.json").read_text())["state"] == "requeued"
    poll(stopped, timeout=60, every=0.2)
    seen = set()
    while True:  # the restart window: ablate must leave the cell alone every time
        [view] = collect([cell])
        seen.add(view.state.value)
        assert view.state.value != "failed", view
        if view.state.value == "running" and json.loads((cell / "status.json").read_text())["attempts"] >= 2:
            break
        again = bench(workdir, "ablate", str(path), "--executor", "slurm")
        assert again.returncode == 0 and "0 to submit" in again.stdout, again.stdout + again.stderr
    assert "requeued" in seen

    def ended() -> CellView | None:
        """the cell to end"""
        [view] = collect([cell])
        return view if view.settled else None
    final = poll(ended, timeout=300, every=2)
    assert final.state.value == "done", final
    launch = json.loads((cell / "launch.json").read_text())
    assert [s["job_id"] for s in launch["submissions"]] == [job_id]  # submitted once
    assert slurm.job_states([job_id])[job_id].restarts == 1
    assert json.loads((cell / "results.json").read_text())["steps"] == total
    assert loss_steps(cell) == list(range(1, total + 1))  # no gap, no repeat
    log_text = "".join(p.read_text() for p in (cell / "logs").glob("*_log.err"))
    assert "resuming" in log_text and f"of {total}" in log_text

    from harness.tracking.runs import run_state
    from harness.tracking.store import client

    uri = store_of(cell).reader_uri()
    assert mlflow_loss_steps(uri, launch["tracking_run_id"]) == list(range(1, total + 1))
    assert run_state(uri, launch["tracking_run_id"]).value == "done"
    runs = client(uri).search_runs([client(uri).get_experiment_by_name("requeue").experiment_id],
                                   "tags.role = 'cell'")
    assert len(runs) == 1  # one MLflow run for the cell, never a second


def test_a_requeued_group_job_resumes_every_student(workdir: Path, demo_assets: tuple[Path, Path]) -> None:
    """`scontrol requeue` of a group job mid-training: every student records `requeued`, the job
    restarts once, and each student resumes from its own checkpoint (not from 0) and ends done with
    every step exactly once, in its folder and in its own MLflow run."""
    # long enough that the steps left after the requeue outlast Slurm's KillWait (5 s), during
    # which the job runs on: ~60 ms a step for the four students here
    base = long_pixel_cell(demo_assets, epochs=20, num_workers=1)
    path = write_grid(workdir, "group_requeue", base, {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10},
                      axes={"model.mask_ratio": [0.5, 0.75], "model.decoder": ["standard", "prompting"]})
    total = 20 * (TRAIN_IMAGES // 16)
    proc = bench(workdir, "ablate", str(path), "--executor", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted 4 cells as 1 job(s) (1 group(s) sharing data and teacher, of 4 cells)" in proc.stdout
    cells = cell_dirs(workdir, "group_requeue")
    [job_id] = {json.loads((c / "launch.json").read_text())["submissions"][-1]["job_id"] for c in cells}

    def checkpointed() -> bool:
        """every student past its first checkpoint"""
        return all((c / "checkpoints" / "latest.pt").is_file() and max(loss_steps(c), default=0) >= 12
                   for c in cells)
    poll(checkpointed, timeout=240, every=0.5)
    # --force on one cell would cancel the job of all four: refused, nothing touched
    force = bench(workdir, "ablate", str(path), "--executor", "slurm", "--force", "--cell", cells[0].name)
    assert force.returncode == 2 and f"--force would cancel job {job_id}, which also trains" in force.stderr, \
        force.stdout + force.stderr
    assert "Traceback" not in force.stdout + force.stderr and slurm.job_states([job_id])[job_id].state == "RUNNING"
    scontrol_requeue(job_id)

    def stopped() -> bool:
        """every student's status.json to say requeued"""
        return all(json.loads((c / "status.json").read_text())["state"] == "requeued" for c in cells)
    poll(stopped, timeout=60, every=0.2)
    again = bench(workdir, "ablate", str(path), "--executor", "slurm")
    assert again.returncode == 0 and "0 to submit" in again.stdout, again.stdout + again.stderr

    def ended() -> list[CellView] | None:
        """the group to end"""
        views = collect(cells)
        return views if all(v.settled for v in views) else None
    final = poll(ended, timeout=400, every=2)
    assert [v.state.value for v in final] == ["done"] * 4, final
    assert slurm.job_states([job_id])[job_id].restarts == 1
    log_text = "".join(p.read_text() for p in (cells[0] / "logs").glob("*_log.err"))
    uri = store_of(cells[0]).reader_uri()
    for cell in cells:
        assert json.loads((cell / "status.json").read_text())["attempts"] == 2
        assert [s["job_id"] for s in json.loads((cell / "launch.json").read_text())["submissions"]] == [job_id]
        assert loss_steps(cell) == list(range(1, total + 1))  # no gap, no repeat
        resumed = re.search(rf"resuming {re.escape(cell.name)} from step (\d+) of {total}", log_text)
        assert resumed and int(resumed.group(1)) >= 10, f"{cell.name} did not resume from its checkpoint"
        run_id = json.loads((cell / "launch.json").read_text())["tracking_run_id"]
        assert mlflow_loss_steps(uri, run_id) == list(range(1, total + 1))
    # and each student computed, to the last bit, what it computes alone and uninterrupted
    from harness.config import load_config
    from harness.run.runner import run
    from harness.train.metrics_log import read_jsonl

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job ran (cpus_per_task 1): a reduction's result depends on the threads
    try:
        alone_runs = [run(load_config(cell / "config.yaml"), workdir / f"{cell.name}-alone") for cell in cells]
    finally:
        torch.set_num_threads(threads)
    for cell, alone in zip(cells, alone_runs):
        assert alone.state == "done"
        requeued, clean = (torch.load(d / "checkpoints" / "latest.pt", weights_only=True)["model"]
                           for d in (cell, workdir / f"{cell.name}-alone"))
        for key, value in clean.items():
            torch.testing.assert_close(requeued[key], value, rtol=0, atol=0, msg=f"{cell.name}: {key}")
        assert [(r["step"], r["train/loss"]) for r in read_jsonl(cell / "metrics.jsonl") if "train/loss" in r] == \
            [(r["step"], r["train/loss"]) for r in read_jsonl(workdir / f"{cell.name}-alone" / "metrics.jsonl")
             if "train/loss" in r]
        assert json.loads((cell / "results.json").read_text())["metrics"]["knn_top1"] == alone.metrics["knn_top1"]


def test_a_cell_requeued_during_its_fine_tune_resumes_from_its_last_epoch(workdir: Path,
                                                                          demo_assets: tuple[Path, Path]) -> None:
    """Requeued after some fine-tune epochs, the job skips pretraining (done), resumes the fine-tune
    after its last epoch checkpoint (the log names the epoch), and logs every epoch's loss once."""
    base = long_pixel_cell(demo_assets, epochs=1, num_workers=0)
    # ~0.4 s an epoch here: the epochs left after the requeue must outlast Slurm's KillWait (5 s,
    # scripts/local-slurm.sh), during which the job runs on (submitit bypasses SIGTERM)
    epochs = 40
    base["eval"] = {"protocols": ["finetune"], "feature_batch_size": 100,
                    "finetune": {"epochs": epochs, "batch_size": 32, "warmup_epochs": 1}}
    path = write_grid(workdir, "requeue_ft", base, {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10})
    proc = bench(workdir, "ablate", str(path), "--executor", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [cell] = cell_dirs(workdir, "requeue_ft")
    job_id = json.loads((cell / "launch.json").read_text())["submissions"][-1]["job_id"]

    def fine_tuning() -> int | None:
        """the fine-tune to finish an epoch"""
        status = json.loads((cell / "status.json").read_text()) if (cell / "status.json").is_file() else {}
        return status["step"] if status.get("stage") == "finetune" and (status.get("step") or 0) >= 2 else None
    at = poll(fine_tuning, timeout=300, every=0.2)
    scontrol_requeue(job_id)

    def ended() -> CellView | None:
        """the cell to end"""
        [view] = collect([cell])
        return view if view.settled else None
    final = poll(ended, timeout=300, every=2)
    assert final.state.value == "done", final
    assert slurm.job_states([job_id])[job_id].restarts == 1
    log_text = "".join(p.read_text() for p in (cell / "logs").glob("*_log.err"))
    resumed = re.search(rf"fine-tuning resumes after epoch (\d+) of {epochs}", log_text)
    assert resumed, f"the fine-tune finished before the requeue killed it (requeued at epoch {at}):\n{log_text}"
    resumed_after = int(resumed.group(1))
    assert at <= resumed_after < epochs
    records = [json.loads(line) for line in (cell / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "finetune/loss" in r] == list(range(1, epochs + 1))
    assert 0 <= json.loads((cell / "results.json").read_text())["metrics"]["finetune_top1"] <= 100
    assert not (cell / "eval").exists()  # the fine-tune's checkpoint goes once results.json has its metrics


def test_a_dead_tracking_server_costs_no_run(workdir: Path, demo_assets: tuple[Path, Path]) -> None:
    """The grid's MLflow server is killed while two cells train: they keep training and end done;
    the report reads the store directly meanwhile; the next `ablate` restarts the server, sends
    what the cells logged, and each cell has exactly one MLflow run with every step once. `status`
    changes nothing in the store, and the parent run ends."""
    import hashlib

    from harness.tracking.server import read_state, stop_group

    base = long_pixel_cell(demo_assets, epochs=12, num_workers=0)
    path = write_grid(workdir, "serverdown", base, {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10},
                      axes={"model.mask_ratio": [0.5, 0.75]})
    total = 12 * (TRAIN_IMAGES // 16)
    proc = bench(workdir, "ablate", str(path), "--executor", "slurm")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cells = cell_dirs(workdir, "serverdown")

    def training() -> bool:
        """both cells to log steps"""
        return all((c / "metrics.jsonl").is_file() and max(loss_steps(c), default=0) >= 3 for c in cells)
    poll(training, timeout=240, every=0.5)
    store = store_of(cells[0])
    stop_group(read_state(store.server_dir).pgid)  # the server dies under the running cells

    def finished() -> bool:
        """the cells to end done without the server"""
        views = collect(cells)
        return all(v.settled for v in views) and [v.state.value for v in views] == ["done", "done"]
    poll(finished, timeout=400, every=2)
    status = bench(workdir, "status", "serverdown")
    assert status.returncode == 0 and "waiting to sync" in status.stdout, status.stdout
    db = Path(store.backend.removeprefix("sqlite:///"))
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    assert bench(workdir, "status", "serverdown").returncode == 0
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest  # status only reads

    down = bench(workdir, "report", "serverdown", "--metric", "knn_top1")
    assert down.returncode == 0 and "not running: reading its store" in down.stderr, down.stdout + down.stderr
    assert "2 done" in down.stdout  # the run folders fill in what the store lacks

    again = bench(workdir, "ablate", str(path), "--executor", "slurm")
    assert again.returncode == 0 and "0 to submit" in again.stdout, again.stdout + again.stderr
    assert "started" in again.stdout and "sent MLflow what 2 finished cell(s) logged" in again.stdout
    from harness.tracking.runs import run_state
    from harness.tracking.store import client

    uri = store.reader_uri()
    assert uri.startswith("http://")
    experiment = client(uri).get_experiment_by_name("serverdown").experiment_id
    runs = client(uri).search_runs([experiment], "tags.role = 'cell'")
    assert len(runs) == 2 and {r.data.tags["status"] for r in runs} == {"done"}
    for cell in cells:
        run_id = json.loads((cell / "launch.json").read_text())["tracking_run_id"]
        assert mlflow_loss_steps(uri, run_id) == list(range(1, total + 1))
    [parent] = client(uri).search_runs([experiment], "tags.role = 'ablate'")
    assert run_state(uri, parent.info.run_id).value == "done"
    after = bench(workdir, "report", "serverdown", "--metric", "knn_top1")
    assert after.returncode == 0 and "2 done" in after.stdout, after.stdout + after.stderr


def test_two_ablates_at_once_submit_each_cell_once(workdir: Path, demo_assets: tuple[Path, Path]) -> None:
    """Two `ablate` of the same grid started at the same moment: each cell goes out once."""
    data, teacher = demo_assets
    base = micro_config(data, teacher)
    base["model"] |= {"target": "pixel", "decoder": "standard", "masking": "random"}
    base["eval"] = {"protocols": []}
    path = write_grid(workdir, "twice", base, {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10},
                      axes={"model.mask_ratio": [0.5, 0.75]})
    command = [sys.executable, str(REPO / "bench.py"), "ablate", str(path), "--executor", "slurm"]
    procs = [subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env()) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert sorted(int(o.split(" to submit")[0].rsplit(" ", 1)[-1]) for o in outputs) == [0, 2], outputs
    for cell in cell_dirs(workdir, "twice"):
        assert len(json.loads((cell / "launch.json").read_text())["submissions"]) == 1
    poll(lambda: all(v.settled for v in collect(cell_dirs(workdir, "twice"))), timeout=300, every=2)


def test_two_task_cell_on_cpu(workdir: Path, demo_assets: tuple[Path, Path]) -> None:
    """A cell with 2 tasks (torch.distributed over gloo on CPU) completes with world size 2:
    half the steps per epoch, features extracted in shards by both ranks and a linear probe trained
    with DDP on both, one log per task, and only rank 0 logs metrics."""
    data, teacher = demo_assets
    base = micro_config(data, teacher)
    base["model"] |= {"target": "pixel", "decoder": "standard", "masking": "random"}
    base["pretrain"] |= {"batch_size": 16}
    base["eval"] = {"protocols": ["knn", "linear"], "feature_batch_size": 100,
                    "linear": {"epochs": 3, "batch_size": 64, "warmup_epochs": 1}}
    base["runtime"] = {"num_workers": 0, "log_every": 1, "checkpoint_every": 4}
    path = write_grid(workdir, "two_tasks", base, {"tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 2,
                                                   "time_min": 10})
    proc = bench(workdir, "ablate", str(path), "--executor", "slurm", "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [cell] = cell_dirs(workdir, "two_tasks")
    steps = TRAIN_IMAGES // (16 * 2)  # world size 2: each step takes 32 images
    results = json.loads((cell / "results.json").read_text())
    assert results["steps"] == steps and 0 <= results["metrics"]["knn_top1"] <= 100
    assert 0 <= results["metrics"]["linear_top1"] <= 100  # the probe trained with DDP on both ranks
    assert not (cell / "eval").exists()  # both ranks' feature shards and the probe's checkpoint, removed
    assert loss_steps(cell) == list(range(1, steps + 1))
    logs = sorted(p.name for p in (cell / "logs").glob("*_log.out"))
    assert len(logs) == 2 and logs[0].endswith("_0_log.out") and logs[1].endswith("_1_log.out")
    assert "global_rank=1(2)" in (cell / "logs" / logs[1]).read_text()
