"""Files of tensors and plain data (checkpoints, feature shards, evaluation progress): written
durably through :func:`harness.core.files.atomic_writer`, read back without unpickling code."""

from pathlib import Path
from typing import Any

import torch

from harness.core.files import atomic_writer


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` into ``path``: a kill at any moment leaves the previous file or this one whole."""
    with atomic_writer(path, durable=True) as f:
        torch.save(state, f)


def load_tensors(path: Path) -> Any:
    """What :func:`save_atomic` wrote, on the CPU (``weights_only``: tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
