"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def require_slurm() -> None:
    """Skip the calling test when no Slurm cluster answers; fail instead when CI=true.

    Start the local cluster with ``bash scripts/local-slurm.sh start`` (as root).
    """
    if shutil.which("sinfo") is None:
        reason = "Slurm not installed (no sinfo on PATH); run `bash scripts/local-slurm.sh start`"
    else:
        try:
            proc = subprocess.run(
                ["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=15
            )
            reason = "" if proc.returncode == 0 else f"sinfo failed: {proc.stderr.strip()}"
        except subprocess.TimeoutExpired:
            reason = "sinfo did not answer within 15 s"
        if reason:
            reason += "; run `bash scripts/local-slurm.sh start`"
    if not reason:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but no Slurm cluster: {reason}", pytrace=False)
    pytest.skip(reason)


def scontrol_requeue(job_id: str) -> None:
    """What an operator does to a running job: ``scontrol requeue`` (the job is requeueable: ablate
    submits with ``--requeue``)."""
    subprocess.run(["scontrol", "requeue", str(job_id)], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A Slurm cluster that answers (skip, or fail under CI=true, when there is none)."""
    require_slurm()


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny demo dataset root, micro CLIP teacher checkpoint), made once per session.

    Real generated data and a real (one-epoch) open_clip teacher, small enough for seconds.
    """
    from harness.data.demo import make_demo_dataset
    from harness.data.demo_teacher import train_demo_teacher

    root = tmp_path_factory.getbasetemp() / "milan-demo-assets"
    data, teacher = root / "data", root / "teacher" / "milan-clip-micro.pt"
    make_demo_dataset(data, train_per_class=30, val_per_class=10)
    if not teacher.is_file():
        train_demo_teacher(data, teacher, model="milan-clip-micro", epochs=1)
    return data, teacher


def micro_config(data_root: Path, teacher_checkpoint: Path, /, **sections: dict) -> dict:
    """A run config (nested dict) that pretrains a few steps and evaluates in seconds;
    ``sections`` update its sections, e.g. ``pretrain={"epochs": 3}``."""
    config = {
        "model": {"size": "vit_micro_patch4", "img_size": 32},
        "teacher": {"model": "milan-clip-micro", "pretrained": str(teacher_checkpoint)},
        "data": {"root": str(data_root)},
        "pretrain": {"epochs": 1, "warmup_epochs": 0.1, "batch_size": 32, "base_lr": 1.2e-3},
        "eval": {"protocols": ["linear", "knn"], "feature_batch_size": 100,
                 "linear": {"epochs": 5, "warmup_epochs": 1, "batch_size": 64, "base_lr": 1.0,
                            "optimizer": "sgd"}},
        "runtime": {"num_workers": 0, "log_every": 2, "checkpoint_every": 2},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The session's loopback `mlflow server` over a SQLite store; stopping it is checked too."""
    from harness.tracking.server import ensure_server, group_alive, stop_server
    from harness.tracking.store import sqlite_uri

    base = tmp_path_factory.getbasetemp() / "mlflow-server"
    info = ensure_server(sqlite_uri(base / "mlflow.db"), base / "artifacts", base / "state", host="127.0.0.1")
    yield info
    stop_server(base / "state")
    assert not group_alive(info.pgid)
