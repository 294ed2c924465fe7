"""The harness's import structure: its stages import downwards only and no stage has an import
cycle (the contracts in pyproject.toml, checked by import-linter)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_harness_keeps_its_import_contracts() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_and_a_cycle_break_the_contracts(tmp_path: Path) -> None:
    shutil.copytree(REPO / "harness", tmp_path / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with (tmp_path / "harness/core/files.py").open("a") as f:  # the base layer reaching up to the reports
        f.write("\nimport harness.report.tables  # noqa\n")
    with (tmp_path / "harness/tracking/store.py").open("a") as f:  # locate imports store: a cycle
        f.write("\nimport harness.tracking.locate  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "harness.core.files -> harness.report.tables" in result.stdout
    assert "No cycles are allowed in harness.tracking" in result.stdout
