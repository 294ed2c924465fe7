"""Dry-run cost estimates: GPU-hours of a cell's pretraining, and what group jobs save.

GPU-hours = FLOPs/image (:func:`harness.milan.flops.train_flops_per_image`) x images/epoch x epochs
/ (sustained FLOP/s per GPU) / 3600, with the rate from the grid's ``estimate.sustained_tflops``
(default 40: the paper's 39 h on 8 A100s for 400 epochs of ViT-B/16 MILAN). Evaluation is not
included. CPU cells report no GPU-hours.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.data.datasets import count_images
from harness.grid import Cell, Grid


def gpu_hours(grid: Grid) -> dict[str, float | str | None]:
    """Run id -> estimated pretraining GPU-hours; ``"cpu"`` for CPU cells, None if unknown
    (no data tree here and no ``estimate.train_images`` in the grid)."""
    r, est = grid.resources, grid.spec.estimate
    if not r.gpus:
        return {cell.run_id: "cpu" for cell in grid.cells}
    from harness.milan.flops import train_flops_per_image  # torch, timm, open_clip: seconds to import

    out: dict[str, float | str | None] = {}
    for cell in grid.cells:
        cfg = cell.config
        if cfg.pretrain.weights_from is not None:  # evaluates a finished run's encoder: no pretraining
            out[cell.run_id] = 0.0
            continue
        images = count_images(Path(cfg.data.root) / cfg.data.train_split) or est.train_images
        if images is None:
            out[cell.run_id] = None
            continue
        flops = train_flops_per_image(cfg.model, cfg.teacher) * images * cfg.pretrain.epochs
        out[cell.run_id] = flops / (est.sustained_tflops * 1e12) / 3600
    return out


@dataclass(frozen=True)
class SharingSaving:
    """What training a grid's cells in group jobs saves, per training image (per epoch)."""

    flops_alone: float  # FLOPs per training image, summed over the cells, one job per cell
    flops_shared: float  # the same in group jobs: each student, one teacher forward per group
    loads_alone: int  # times each training image is decoded and augmented: once per cell
    loads_shared: int  # once per group job

    @property
    def flops_saved(self) -> float:
        return 1 - self.flops_shared / self.flops_alone if self.flops_alone else 0.0

    def summary(self) -> str:
        return (f"sharing saves {self.flops_saved:.0%} of the pretraining FLOPs "
                f"({self.flops_alone / 1e9:,.1f} -> {self.flops_shared / 1e9:,.1f} GFLOPs per training image "
                f"over the grid's cells, counted with torch's FlopCounterMode) and decodes each training image "
                f"{self.loads_shared}x instead of {self.loads_alone}x")


def sharing_saving(cells: Sequence[Cell], groups: Sequence[Sequence[int]]) -> SharingSaving:
    """FLOPs per training image and image loads of the cells that pretrain (0-epoch cells train
    nothing), one job per cell against the group jobs ``groups`` (indices into ``cells``)."""
    from harness.milan.flops import group_flops_per_image, train_flops_per_image

    alone = shared = 0.0
    loads_alone = loads_shared = 0
    for group in groups:
        members = [cells[i].config for i in group if cells[i].config.pretrain.epochs > 0]
        if not members:
            continue
        alone += sum(train_flops_per_image(c.model, c.teacher) for c in members)
        shared += group_flops_per_image([(c.model, c.teacher) for c in members])
        loads_alone += len(members)
        loads_shared += 1
    return SharingSaving(alone, shared, loads_alone, loads_shared)


def job_hours(cells: Sequence[Cell], groups: Sequence[Sequence[int]], hours: dict[str, float | str | None],
              gpus: int) -> list[float] | None:
    """Estimated wall-clock hours of each job's pretraining on its ``gpus`` GPUs (``groups``: indices
    into ``cells`` per job; ``hours``: :func:`gpu_hours`), a group job at its shared FLOPs; None
    when any is unknown or the jobs run on CPUs."""
    if not gpus:
        return None
    out = []
    for group in groups:
        alone = [hours.get(cells[i].run_id) for i in group]
        if not all(isinstance(h, float) for h in alone):
            return None
        out.append(sum(alone) * (1 - sharing_saving(cells, [group]).flops_saved) / gpus)
    return out
