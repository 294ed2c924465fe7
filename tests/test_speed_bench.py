"""The prepared device benchmark (scripts/device-bench.sh) in its CPU mode at micro size: every row it
measures on a GPU is measured here too, so the script cannot rot while no GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_device_benchmark_runs_every_row_in_cpu_mode(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "scripts/device-bench.sh", "cpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "device-bench.json").read_text())
    rows = {(r["row"], r["compile"], r["note"].split(",")[0]): r for r in report["rows"]}
    for name in ("mae", "clip", "milan", "group of 8"):
        row = rows[(name, "off", "")]
        assert row["images_per_s"] > 0 and 0 < row["mfu"] < 1 and row["gflops_per_image"] > 0, row
    assert rows[("group of 8", "off", "")]["students"] == 8
    assert rows[("milan", "all", "")]["images_per_s"] > 0 and rows[("group of 8", "all", "")]["images_per_s"] > 0
    assert rows[("largest batch", "off", "milan: fits at the search's limit 32")]["batch"] == 32
    assert [r["cores"] for r in report["rows"] if r["row"] == "loader (CPU)"] == [1, 1]  # 0 and 1 worker(s)
    assert {r["note"].split(",")[0] for r in report["rows"] if r["row"] == "milan + loader"} == \
        {"data.decode=cpu", "data.decode=gpu"}
    assert report["peak_tflops"] > 0 and "cores per GPU" in proc.stdout
