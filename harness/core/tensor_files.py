"""Files of tensors and plain data (checkpoints, feature shards, evaluation progress): written
durably through :func:`harness.core.files.atomic_writer`, read back without unpickling code."""

from pathlib import Path
from typing import Any

import torch

from harness.core.files import atomic_writer


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` into ``path``: a kill at any moment leaves the previous file or this one whole; a
    full disk is one line naming the path and the space the tensors need (:class:`~harness.core.files.DiskFull`)."""
    with atomic_writer(path, durable=True, size=_tensor_bytes(state)) as f:
        torch.save(state, f)


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nelement() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def load_tensors(path: Path) -> Any:
    """What :func:`save_atomic` wrote, on the CPU (``weights_only``: tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
