"""`bench.py ablate` end to end with the local executor (real jobs, real MLflow store).

Cells are tiny (vit_micro_patch4 at 32 px, a demo dataset of 30 + 10 images per class and a
milan-clip-micro teacher trained for one epoch, both made once per session under pytest's
temporary folder) so that the whole file takes a minute or two on two cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    """No GRID: ablations/smoke.yaml (here a 2-cell stand-in in a fresh folder), the local
    executor, waiting, the default SQLite store in the cwd, and reports/smoke/report.md."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "ablations").mkdir()
    grid = {"name": "smoke", "base": micro_config(*demo_assets), "axes": {"model.target": ["pixel", "clip"]},
            "resources": {"cpus_per_task": 1, "time_min": 10}}
    (tmp_path / "ablations" / "smoke.yaml").write_text(yaml.safe_dump(grid))

    code, out = invoke("ablate")
    assert code == 0, out
    assert "2 to submit with the local executor" in out
    assert "running 2 cells here, 2 at a time with 1 torch thread(s) each" in out
    report = tmp_path / "reports" / "smoke" / "report.md"
    assert report.is_file() and f"{Path('reports/smoke/report.md')}: 2 cells, 2 runs (2 done)" in out
    assert "target=clip" in report.read_text()
    assert re.search(r"grid smoke took \d+\.\d s\n", out)  # the assets were made already: no set-up part
    assert (tmp_path / "mlflow.db").is_file()
    cells = sorted((tmp_path / "runs" / "smoke").glob("target-*"))
    assert len(cells) == 2
    for cell in cells:
        results = json.loads((cell / "results.json").read_text())
        assert {"linear_top1", "knn_top1"} <= results["metrics"].keys()
        launch = json.loads((cell / "launch.json").read_text())
        assert launch["submissions"][-1]["executor"] == "local" and launch["mlflow_run_id"]
        assert (cell / "logs").resolve() == Path(launch["submissions"][-1]["log_dir"])

    from harness.report.ingest import load_runs

    runs, _ = load_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "smoke")
    assert sorted(runs["status"]) == ["done", "done"] and runs["linear_top1"].notna().all()

    # idempotent: nothing is rerun, the report is rebuilt from the store
    code, again = invoke("ablate")
    assert code == 0 and "2 cells (2 done); 0 to submit" in again, again
    code, status = invoke("status", "smoke")
    assert code == 0 and "grid smoke: 2 done" in status and "linear_top1=" in status

    # a failed cell is resubmitted and resumes in its own folder and MLflow run
    failed = cells[0]
    mlflow_run = json.loads((failed / "launch.json").read_text())["mlflow_run_id"]
    (failed / "results.json").unlink()
    status_file = failed / "status.json"
    status_file.write_text(json.dumps({**json.loads(status_file.read_text()), "state": "failed", "reason": "test"}))
    code, out = invoke("ablate")
    assert code == 0 and "1 to submit" in out, out
    assert json.loads((failed / "launch.json").read_text())["mlflow_run_id"] == mlflow_run
    assert len(json.loads((failed / "launch.json").read_text())["submissions"]) == 2  # first run, rerun
    assert (failed / "results.json").is_file()


def test_local_failure_is_reported_with_reason_and_log(demo_assets: tuple[Path, Path], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A cell that crashes ends failed (exit code 1) with its reason and the tail of its log."""
    monkeypatch.chdir(tmp_path)
    grid = {"name": "broken", "base": {**micro_config(*demo_assets), "eval": {"protocols": []}},
            "axes": {"pretrain.batch_size": [1000]}, "resources": {"time_min": 10}}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(grid))
    code, out = invoke("ablate", str(path), "--executor", "local",
                       "--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}")
    assert code == 1, out
    assert re.search(r"FAILED batch_size=1000 seed=0: ConfigError: the training split has 300 images, "
                     r"fewer than one step \(1000\)", out), out
    assert "| harness.errors.ConfigError" in out  # the last lines of the job's stderr
    code, status = invoke("status", "broken")
    assert "grid broken: 1 failed" in status and "fewer than one step" in status
