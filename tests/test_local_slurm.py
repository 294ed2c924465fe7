"""Against a real Slurm cluster (``bash scripts/local-slurm.sh start``); no sacct needed.

Skipped when Slurm is absent, failed when CI=true (see ``require_slurm`` in conftest.py).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import scontrol_requeue

from harness.launch import slurm

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}


def wait_for(
    job_ids: list[str], done: Callable[[dict[str, slurm.SlurmJobState]], bool], timeout: float = 30
) -> dict[str, slurm.SlurmJobState]:
    """Poll job_states until ``done(states)`` or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        states = slurm.job_states(job_ids)
        if done(states):
            return states
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s; last states: {states}")
        time.sleep(0.5)


def in_squeue(job_id: str) -> bool:
    """Whether plain squeue (active jobs only) still lists the job."""
    out = subprocess.run(
        ["squeue", "--noheader", "--array", f"--jobs={job_id}", "--format=%i"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return job_id in out.split()


def sbatch(tmp_path: Path, *args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/%j.out", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().split(";")[0]


def test_partitions() -> None:
    assert slurm.slurm_available()
    parts, default = slurm.partitions()
    assert parts and all(not p.endswith("*") for p in parts)
    assert default in parts


def test_sbatch_job_running_then_completed(tmp_path: Path) -> None:
    job_id = sbatch(tmp_path, "--cpus-per-task=1", "--wrap", "sleep 2")
    first = slurm.job_states([job_id])[job_id]
    assert first.state in {"PENDING", "CONFIGURING", "RUNNING"}
    running = wait_for([job_id], lambda s: s[job_id].state == "RUNNING")[job_id]
    assert running.node
    # finished jobs leave squeue; the state then comes from `scontrol show job`
    wait_for([job_id], lambda s: s[job_id].state not in ACTIVE and not in_squeue(job_id))
    done = slurm.job_states([job_id])[job_id]
    assert (done.state, done.restarts) == ("COMPLETED", 0), done
    assert not in_squeue(job_id)


def test_submitit_array(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=10, cpus_per_task=1, mem_gb=0.5)

    def square(x: int) -> int:  # nested: pickled by value, nothing to import on the node
        time.sleep(1)
        return x * x

    jobs = executor.map_array(square, range(4))
    ids = [job.job_id for job in jobs]
    base = ids[0].split("_")[0]
    assert ids == [f"{base}_{i}" for i in range(4)]
    first = slurm.job_states(ids)
    assert {s.state for s in first.values()} <= ACTIVE | {"COMPLETED"}, first
    assert [job.result() for job in jobs] == [0, 1, 4, 9]  # result files, not sacct
    final = wait_for(ids + [base], lambda s: all(st.state == "COMPLETED" for st in s.values()))
    assert final[base].state == "COMPLETED"  # the array as a whole


def test_cancelled_submitit_job(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=10, cpus_per_task=1, mem_gb=0.5)
    job = executor.submit(time.sleep, 120)
    wait_for([job.job_id], lambda s: s[job.job_id].state == "RUNNING")
    slurm.cancel([job.job_id])
    states = wait_for([job.job_id], lambda s: s[job.job_id].state == "CANCELLED")
    assert states[job.job_id].state == "CANCELLED"
    # without sacct submitit cannot tell: no result file, so it never reports done
    assert not job.done()


def test_requeue_counts_restarts(tmp_path: Path) -> None:
    job_id = sbatch(tmp_path, "--requeue", "--wrap", "sleep 60")
    try:
        wait_for([job_id], lambda s: s[job_id].state == "RUNNING")
        scontrol_requeue(job_id)
        state = wait_for([job_id], lambda s: s[job_id].restarts == 1)[job_id]
        assert state.state in {"REQUEUED", "PENDING", "COMPLETING", "RUNNING"}, state
    finally:
        slurm.cancel([job_id])


def test_unknown_job() -> None:
    assert slurm.job_states(["999999999"])["999999999"].state == "UNKNOWN"
