"""``bench.py ablate --until-resolved`` with the local executor (rounds run in turn here) and its
bad input (one line, exit 2, nothing submitted).

Cells are the micro cells of test_ablate_local.py: vit_micro_patch4 at 32 px on a demo dataset
of 30 + 10 images per class, one axis of two values plus the random-init reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import micro_config
from harness.cli import app


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def grid_file(demo_assets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = micro_config(*demo_assets)
    base["eval"] = {**base["eval"], "protocols": ["knn"]}
    path = tmp_path / "rounds.yaml"
    path.write_text(yaml.safe_dump({"name": "rounds", "base": base, "axes": {"model.target": ["pixel", "clip"]},
                                    "seeds": 2, "resources": {"cpus_per_task": 1, "time_min": 10}}))
    return path


def test_local_rounds_run_in_turn_until_the_seed_budget(grid_file: Path, tmp_path: Path) -> None:
    """A margin too small to call anything negligible: round 1 at 2 seeds, its look, round 2 at 3
    seeds (the cap), its look, then the stop for the budget; the report says so. A rerun resumes
    the stopped chain and submits nothing."""
    code, out = invoke("ablate", str(grid_file), "--executor", "local", "--until-resolved", "--max-seeds", "3",
                       "--margin", "0.001")
    assert code == 0, out
    assert "looks at 2, 3 seeds" in out
    assert "round 1: the grid at 2 seeds" in out and "round 2: the grid at 3 seeds" in out
    # round 2 adds seed 2 only (2 cells, the random-init and the teacher reference): done cells are skipped
    assert "8 to submit" in out and "4 to submit" in out
    assert "look 1 at 2 seeds" in out and "look 2 at 3 seeds" in out
    assert "stopped: budget: 3 seeds is the cap (--max-seeds 3)" in out
    chain = json.loads((tmp_path / "runs" / "rounds" / "until_resolved.json").read_text())
    assert [r["seeds"] for r in chain["rounds"]] == [2, 3] and chain["decided"] == 2
    state = json.loads((tmp_path / "runs" / "rounds" / "sequential.json").read_text())
    assert [look["seeds"] for look in state["looks"]] == [2, 3] and state["looks"][-1]["alpha_spent"] == pytest.approx(0.05)
    report = (tmp_path / "reports" / "rounds" / "report.md").read_text()
    assert "## Until resolved: sequential verdicts" in report and "Looks taken: 2" in report
    assert "Stopped: budget: 3 seeds is the cap" in report

    code, status = invoke("status", "rounds")
    assert code == 0 and "until resolved: round 2, the grid at 3 seeds" in status and "stopped: budget" in status

    code, again = invoke("ablate", str(grid_file), "--executor", "local", "--until-resolved", "--max-seeds", "3",
                         "--margin", "0.001")
    assert code == 0 and "resuming the chain" in again and "stopped: budget" in again, again
    assert "to submit" not in again


def test_local_rounds_stop_at_the_first_look_when_every_effect_is_negligible(grid_file: Path,
                                                                            tmp_path: Path) -> None:
    """A margin of 100 points: every effect negligible at the first look; no second round."""
    code, out = invoke("ablate", str(grid_file), "--executor", "local", "--until-resolved", "--max-seeds", "6",
                       "--margin", "100", "--effects", "target")
    assert code == 0, out
    assert "stopped: every effect in scope has a verdict after 1 look(s)" in out
    assert "target: negligible" in out and "round 2" not in out


@pytest.mark.parametrize("args, message", [
    (("--max-seeds", "1"), "--max-seeds 1 is below one round: the first round has 2 seeds"),
    (("--max-seeds", "4", "--seeds", "1"), "--until-resolved needs replicates and grid rounds has one seed"),
    (("--max-seeds", "4", "--effects", "target,decoder"), "--effects: no effect 'decoder' in this grid"),
    ((), "--until-resolved needs a budget"),
    (("--max-seeds", "4", "--max-hours", "0"), "--max-hours 0 is not a budget"),
])
def test_bad_input_is_one_line_and_exit_2_with_nothing_submitted(grid_file: Path, tmp_path: Path,
                                                                 args: tuple[str, ...], message: str) -> None:
    result = CliRunner().invoke(app, ["ablate", str(grid_file), "--executor", "local", "--until-resolved", *args],
                                catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert not (tmp_path / "runs" / "rounds").exists()


def test_budget_options_need_until_resolved(grid_file: Path) -> None:
    code, out = invoke("ablate", str(grid_file), "--executor", "local", "--max-seeds", "4")
    assert code == 2 and "go with --until-resolved" in out and out.count("\n") == 1
