"""``ablate --until-resolved`` on the loopback Slurm cluster (``bash scripts/local-slurm.sh start``):
the rounds run unattended, each next round submitted by a decision job that depends on the round's
jobs, and neither a killed nor a twice-started decision job submits a round twice.

Skipped when Slurm is absent, failed when CI=true (``slurm_cluster`` in conftest.py). Cells are
micro cells (test_slurm_ablate.py's): one axis of two values plus the random-init reference, k-NN
only, two seeds in the first round and a cap of three.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import micro_config

from harness.launch import slurm
from harness.launch.cell_views import collect

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slurm-rounds")
    yield path
    from harness.tracking.server import stop_server

    stop_server(path / "runs" / ".mlflow-server")


def bench(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, str(REPO / "bench.py"), *args], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONUNBUFFERED": "1"})


def chain_of(workdir: Path) -> dict:
    return json.loads((workdir / "runs" / "rounds" / "until_resolved.json").read_text())


def wait_for(what, timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    while not (value := what()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what.__doc__}")
        time.sleep(every)
    return value


def test_rounds_run_unattended_and_decision_jobs_killed_or_doubled_submit_no_round_twice(
        workdir: Path, demo_assets: tuple[Path, Path]) -> None:
    base = micro_config(*demo_assets)
    base["eval"] = {**base["eval"], "protocols": ["knn"]}
    grid = workdir / "rounds.yaml"
    grid.write_text(yaml.safe_dump({"name": "rounds", "base": base, "axes": {"model.target": ["pixel", "clip"]},
                                    "seeds": 2, "resources": {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10}}))
    command = ("ablate", str(grid), "--executor", "slurm", "--until-resolved", "--max-seeds", "3",
               "--margin", "0.001")
    started = time.monotonic()
    first = bench(workdir, *command)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "round 1: the grid at 2 seeds" in first.stdout and "the next decision is Slurm job" in first.stdout
    first_decision = chain_of(workdir)["rounds"][0]["decision_job"]

    def round_two_queued() -> bool:
        """round 2 submitted by round 1's decision job"""
        rounds = chain_of(workdir)["rounds"]
        return len(rounds) == 2 and rounds[1]["submitted"] and rounds[1]["decision_job"] is not None

    wait_for(round_two_queued, timeout=240)
    gdir = workdir / "runs" / "rounds"
    log = next((gdir / ".submitit" / first_decision).glob("*_log.out")).read_text()
    assert "look 1 at 2 seeds" in log and "round 2: the grid at 3 seeds" in log  # unattended, on the cluster

    # round 2's decision job is killed: the chain stalls; ablate again by hand picks it up (a new
    # decision job while round 2's cells run, or the look here once they have ended)
    killed = chain_of(workdir)["rounds"][1]["decision_job"]
    slurm.cancel([killed])
    wait_for(lambda: slurm.job_states([killed])[killed].finished, timeout=60, every=1)
    again = bench(workdir, *command)
    assert again.returncode == 0 and "resuming the chain" in again.stdout, again.stdout + again.stderr
    assert "to submit" not in again.stdout  # round 2 went out once already

    def stopped() -> bool:
        """the chain's stop, and round 2's decision job ended"""
        chain = chain_of(workdir)
        job = chain["rounds"][1]["decision_job"]
        return bool(chain["stop_reason"]) and slurm.job_states([job])[job].finished

    wait_for(stopped, timeout=240)
    elapsed = time.monotonic() - started

    # a decision job of round 2 started a second time, after the chain stopped: it submits nothing
    from harness.launch.rounds import Statistics, _submit_decision_job, read_chain
    from harness.report import sequential

    statistics = Statistics(sequential.start, sequential.decide, sequential.scope_for, sequential.look_schedule)
    twin = _submit_decision_job(gdir, read_chain(gdir), sorted({j.split("_")[0] for j in read_chain(gdir).rounds[1].job_ids}),
                                statistics)
    wait_for(lambda: slurm.job_states([twin])[twin].finished, timeout=120)
    twin_log = next((gdir / ".submitit" / twin).glob("*_log.out")).read_text()
    assert "until resolved: stopped: budget" in twin_log and "to submit" not in twin_log

    chain = chain_of(workdir)
    assert [r["seeds"] for r in chain["rounds"]] == [2, 3] and chain["decided"] == 2
    assert chain["stop_reason"].startswith("budget: 3 seeds is the cap")
    views = collect([gdir / f for f in json.loads((gdir / "grid.json").read_text())["folders"]])
    assert len(views) == 12 and all(v.state.value == "done" for v in views)  # 3 seeds x (2 cells, 2 references)
    assert all(len(v.record.submissions) == 1 for v in views)  # no cell of any round went out twice

    status = bench(workdir, "status", "rounds")
    assert "until resolved: round 2, the grid at 3 seeds" in status.stdout and "stopped: budget" in status.stdout
    state = json.loads((gdir / "sequential.json").read_text())
    looks = [(look["seeds"], round(look["decided_at"] - chain["started_at"], 1)) for look in state["looks"]]
    print(f"\nuntil resolved on Slurm: looks (seeds, s after the start) {looks}; {elapsed:.1f} s in all; "
          f"stopped: {chain['stop_reason']}")
