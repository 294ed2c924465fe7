"""`bench.py ablate` end to end with the local executor (real jobs, real MLflow store).

Cells are tiny (vit_micro_patch4 at 32 px, a demo dataset of 30 + 10 images per class and a
milan-clip-micro teacher trained for one epoch, both made once per session under pytest's
temporary folder) so that the whole file takes a minute or two on two cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import micro_config
from harness.cli import app

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_ablate_without_grid_runs_the_smoke_grid_locally_and_writes_the_report(
        demo_assets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No GRID: ablations/smoke.yaml (here a 2-cell stand-in in a fresh folder, plus its random-init
    reference), the local executor, waiting, the default SQLite store in the cwd, and
    reports/smoke/report.md."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "ablations").mkdir()
    grid = {"name": "smoke", "base": micro_config(*demo_assets), "axes": {"model.target": ["pixel", "clip"]},
            "resources": {"cpus_per_task": 1, "time_min": 10}}
    (tmp_path / "ablations" / "smoke.yaml").write_text(yaml.safe_dump(grid))

    code, out = invoke("ablate")
    assert code == 0, out
    assert "4 to submit with the local executor" in out
    # the two cells differ only in their target: one group job; the two references (neither trains) another
    assert ("running 4 cells here as 2 job(s) (2 group(s) sharing data and teacher, of 2, 2 cells), "
            "2 at a time with 1 torch thread(s) each") in out
    report = tmp_path / "reports" / "smoke" / "report.md"
    assert report.is_file() and f"{Path('reports/smoke/report.md')}: 4 cells, 4 runs (4 done)" in out
    assert "target=clip" in report.read_text() and "random init" in report.read_text()
    assert "student vs teacher" in report.read_text() and "mean of 1 cells − teacher" in report.read_text()
    # one seed, one two-level axis: no interval is possible, and the report says so
    assert "not resolved: one seed" in out and "--seeds 2" in out
    assert re.search(r"grid smoke took \d+\.\d s\n", out)  # the assets were made already: no set-up part
    assert (tmp_path / "mlflow.db").is_file()
    cells = sorted((tmp_path / "runs" / "smoke").glob("target-*"))
    assert len(cells) == 2
    for cell in cells:
        results = json.loads((cell / "results.json").read_text())
        assert {"linear_top1", "knn_top1"} <= results["metrics"].keys()
        launch = json.loads((cell / "launch.json").read_text())
        assert launch["submissions"][-1]["executor"] == "local" and launch["tracking_run_id"]
        assert (cell / "logs").resolve() == Path(launch["submissions"][-1]["log_dir"])

    from harness.tracking.read import load_runs

    runs, _ = load_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "smoke")
    assert sorted(runs["status"]) == ["done"] * 4 and runs["linear_top1"].notna().all()
    assert sorted(runs["role"]) == ["cell", "cell", "random_init", "teacher"]

    # idempotent: nothing is rerun, the report is rebuilt from the store
    code, again = invoke("ablate")
    assert code == 0 and "4 cells (4 done); 0 to submit" in again, again
    code, status = invoke("status", "smoke")
    assert code == 0 and "grid smoke: 4 done" in status and "linear_top1=" in status
    assert status.count("(group of 2)") == 4, status  # the cells' group, and the two references

    # a failed cell is resubmitted and resumes in its own folder and MLflow run
    failed = cells[0]
    mlflow_run = json.loads((failed / "launch.json").read_text())["tracking_run_id"]
    (failed / "results.json").unlink()
    status_file = failed / "status.json"
    status_file.write_text(json.dumps({**json.loads(status_file.read_text()), "state": "failed", "reason": "test"}))
    code, out = invoke("ablate")
    assert code == 0 and "1 to submit" in out, out
    assert json.loads((failed / "launch.json").read_text())["tracking_run_id"] == mlflow_run
    assert len(json.loads((failed / "launch.json").read_text())["submissions"]) == 2  # first run, rerun
    assert (failed / "results.json").is_file()

    # --force --cell reruns one cell from scratch (a corrupt checkpoint's fix), the other is left alone
    other_results = (cells[1] / "results.json").read_bytes()
    code, out = invoke("ablate", "--force", "--cell", cells[0].name)
    assert code == 0 and "1 cells (1 done); 1 to restart" in out, out
    assert len(json.loads((cells[0] / "launch.json").read_text())["submissions"]) == 1  # a fresh folder
    assert (cells[1] / "results.json").read_bytes() == other_results


def test_two_seed_grid_gives_effects_with_intervals_verdicts_and_forest_plot(
        demo_assets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's path: a real 2x2 grid with 2 seeds (and its random-init reference per seed) ends
    with tables/effects.* (every column), the forest plot, a verdict table in the terminal and the
    verdicts in words at the top of report.md."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    grid = {"name": "effects", "base": micro_config(*demo_assets), "seeds": 2, "margin": 2.5,
            "axes": {"model.target": ["pixel", "clip"], "model.masking": ["random", "semantic"]},
            "resources": {"cpus_per_task": 1, "time_min": 10}}
    (tmp_path / "effects.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))  # axes in this order
    code, out = invoke("ablate", "effects.yaml", "--executor", "local")
    assert code == 0, out
    assert "12 to submit" in out  # 4 cells x 2 seeds + the untrained encoder and the teacher per seed
    folder = tmp_path / "reports" / "effects"
    effects = pd.read_csv(folder / "tables" / "effects.csv")
    assert list(effects["effect"]) == ["pretrained vs random init", "student vs teacher", "target", "masking",
                                       "target × masking"]
    assert {"effect", "levels", "estimate", "ci_low", "ci_high", "p_value", "p_holm", "verdict", "n_seeds",
            "mde"} <= set(effects.columns)
    assert (effects["n_seeds"] == 2).all() and effects[["ci_low", "ci_high", "p_value", "mde"]].notna().all().all()
    assert (effects["ci_low"] <= effects["estimate"]).all() and (effects["estimate"] <= effects["ci_high"]).all()
    assert set(effects["verdict"]) <= {"resolved +", "resolved -", "negligible", "not resolved"}
    for fmt in ("md", "tex", "html"):
        assert (folder / "tables" / f"effects.{fmt}").stat().st_size > 0
    assert (folder / "figures" / "effects.png").stat().st_size > 10_000
    report = (folder / "report.md").read_text()
    assert "**Verdicts** on linear-probe top-1 (%), from 2 seeds: OLS with seed as block" in report
    assert "within ±2.5 points" in report  # the grid file's margin
    assert "CPU core-hours so far" in report  # cost in the unit the grid ran on, not zeros
    assert "pretrained vs random init" in out and "p_holm" in out  # the terminal verdict table
    if (effects["verdict"] == "not resolved").any():  # the command that would settle it
        assert re.search(r"`python bench\.py ablate effects\.yaml --seeds \d+`", report)

    # --margin overrides the grid's; nothing is rerun
    code, again = invoke("report", "effects", "--margin", "100", "--no-log")
    assert code == 0 and "within ±100 points" in again, again
    assert set(pd.read_csv(folder / "tables" / "effects.csv")["verdict"]) == {"negligible"}


def test_local_failure_is_reported_with_reason_and_log(demo_assets: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell that fails at run time ends failed (exit code 1) with its reason and the tail of its log."""
    monkeypatch.chdir(tmp_path)
    grid = {"name": "broken", "base": {**micro_config(*demo_assets), "eval": {"protocols": []}},
            "axes": {"pretrain.lr": [1e12]}, "resources": {"time_min": 10}, "random_init": False, "teacher_reference": False}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, out = invoke("ablate", str(path), "--executor", "local",
                       "--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}")
    assert code == 1, out
    assert re.search(r"FAILED lr=1000000000000.0 seed=0 at stage pretrain: loss became (nan|inf) at step \d+", out), out
    assert "_log.err:" in out and "| " in out  # the last lines of the job's log
    code, status = invoke("status", "broken")
    assert "grid broken: 1 failed" in status and "loss became" in status


def test_a_train_split_smaller_than_one_step_is_refused_before_anything_is_submitted(
        demo_assets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    grid = {"name": "tiny", "base": {**micro_config(*demo_assets), "eval": {"protocols": []}},
            "axes": {"pretrain.batch_size": [1000]}, "random_init": False, "teacher_reference": False}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, out = invoke("ablate", str(path), "--executor", "local", "--tracking-uri", f"sqlite:///{tmp_path / 's.db'}")
    assert code == 2 and "has 300 images, fewer than one optimizer step (1000 x 1 accumulation x 1 rank(s))" in out
    assert "Traceback" not in out and not (tmp_path / "s.db").exists()
    assert [p.name for p in (tmp_path / "runs" / "tiny").iterdir()] == [".lock"]  # no cell folder, no record


def test_sigterm_with_busy_dataloader_workers_is_requeued_not_failed(
        demo_assets: tuple[Path, Path], tmp_path: Path) -> None:
    """A local cell stopped by SIGTERM (to the job and its DataLoader workers, as a scheduler sends
    it) records `requeued`, not `failed`; `status` says so and leaves the store unchanged; the next
    `ablate` resumes it from its checkpoint to done, in the same MLflow run, and ends the parent."""
    import hashlib
    import signal
    import subprocess
    import sys
    import time

    import psutil

    base = micro_config(*demo_assets)
    base["model"] |= {"target": "pixel", "decoder": "standard", "masking": "random"}
    base["pretrain"] |= {"epochs": 20, "batch_size": 16}
    base["eval"] = {"protocols": ["knn"], "feature_batch_size": 100}
    base["runtime"] = {"num_workers": 2, "log_every": 1, "checkpoint_every": 10}
    path = tmp_path / "stop.yaml"
    path.write_text(yaml.safe_dump({"name": "stop", "base": base, "resources": {"time_min": 10}, "random_init": False, "teacher_reference": False}))
    store = tmp_path / "mlflow.db"
    command = [sys.executable, str(REPO / "bench.py"), "ablate", str(path), "--executor", "local",
               "--tracking-uri", f"sqlite:///{store}"]
    ablate = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cell = tmp_path / "runs" / "stop"
    deadline = time.monotonic() + 240
    while True:
        folders = [f for f in cell.glob("baseline*") if (f / "metrics.jsonl").is_file()]
        if folders and (folders[0] / "checkpoints" / "latest.pt").is_file():
            break
        assert time.monotonic() < deadline and ablate.poll() is None, "the cell never checkpointed"
        time.sleep(0.5)
    [folder] = folders
    job = psutil.Process(int(json.loads((folder / "launch.json").read_text())["submissions"][-1]["job_id"]))
    workers = job.children(recursive=True)
    assert workers, "the DataLoader workers should be running"
    for proc in [job, *workers]:
        proc.send_signal(signal.SIGTERM)
    out = ablate.communicate(timeout=120)[0]
    status = json.loads((folder / "status.json").read_text())
    assert status["state"] == "requeued", (status, out)
    assert "SIGTERM" in status["reason"]

    digest = hashlib.sha256(store.read_bytes()).hexdigest()
    code, shown = invoke("status", "stop", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0 and "requeued" in shown and "failed" not in shown, shown
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest  # status only reads

    run_id = json.loads((folder / "launch.json").read_text())["tracking_run_id"]
    resumed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0 and "1 to submit" in resumed.stdout, resumed.stdout + resumed.stderr
    assert json.loads((folder / "status.json").read_text())["state"] == "done"
    assert json.loads((folder / "launch.json").read_text())["tracking_run_id"] == run_id
    from harness.tracking.store import client

    uri = f"sqlite:///{store}"
    total = 20 * (300 // 16)
    assert sorted(m.step for m in client(uri).get_metric_history(run_id, "train/loss")) == list(range(1, total + 1))
    experiment = client(uri).get_experiment_by_name("stop").experiment_id
    first, second = client(uri).search_runs([experiment], "tags.role = 'ablate'", order_by=["start_time ASC"])
    assert (first.info.status, second.info.status) == ("FAILED", "FINISHED")  # every parent run ends
    assert "1 of 1 cells had not ended when a later ablate took them over" in first.data.tags["failure_reason"]


def test_two_local_ablates_at_once_run_each_cell_once(demo_assets: tuple[Path, Path], tmp_path: Path) -> None:
    """Two `ablate` of one grid started together on the local executor: each cell is submitted once,
    and both commands follow the cells to the end."""
    import subprocess
    import sys

    grid = {"name": "twice", "base": {**micro_config(*demo_assets), "eval": {"protocols": []}},
            "axes": {"model.target": ["pixel", "clip"]}, "resources": {"time_min": 10}, "random_init": False, "teacher_reference": False}
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(grid))
    command = [sys.executable, str(REPO / "bench.py"), "ablate", str(path), "--executor", "local",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    procs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(int(o.split(" to submit")[0].rsplit(" ", 1)[-1]) for o in outputs) == [0, 2], outputs
    for folder in (tmp_path / "runs" / "twice").glob("target-*"):
        assert len(json.loads((folder / "launch.json").read_text())["submissions"]) == 1
        assert json.loads((folder / "status.json").read_text())["state"] == "done"
