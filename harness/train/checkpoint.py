"""Atomic training checkpoints.

A checkpoint is written through :func:`harness.core.files.atomic_writer` (a temporary file in the
same folder, flushed to disk, renamed over ``latest.pt``): a kill at any moment leaves either the
previous complete checkpoint or the new complete one, never a torn file.
"""

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harness.core.errors import UserError
from harness.core.tensor_files import load_tensors

LATEST = "latest.pt"
CHECKPOINT_DIR = "checkpoints"  # under the run folder


def checkpoint_file(run_dir: Path) -> Path:
    """A run's latest pretraining checkpoint."""
    return Path(run_dir) / CHECKPOINT_DIR / LATEST


class CorruptCheckpoint(UserError):
    """A checkpoint that does not load; the message names the file and how to start the cell over."""


def load_latest(folder: Path) -> dict[str, Any] | None:
    """The latest checkpoint in ``folder``.

    Checkpoints hold only tensors and plain Python data, so they load with ``weights_only=True``
    like any published checkpoint (and ``bench.py evaluate`` reads them the same way).
    """
    path = folder / LATEST
    if not path.is_file():
        return None
    try:
        return load_tensors(path)
    except Exception as err:  # a torn copy, a full disk, a file from elsewhere
        raise CorruptCheckpoint(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]}): "
            "rerun this cell from scratch (`bench.py ablate GRID --force --cell CELL`, or delete the "
            "file to restart the run)") from None


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from, as tensors and plain data (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
