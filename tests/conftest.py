"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess

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


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A Slurm cluster that answers (skip, or fail under CI=true, when there is none)."""
    require_slurm()
