"""Dry-run cost estimate: GPU-hours of a cell's pretraining.

GPU-hours = FLOPs/image (:func:`harness.milan.flops.train_flops_per_image`) x images/epoch x epochs
/ (sustained FLOP/s per GPU) / 3600, with the rate from the grid's ``estimate.sustained_tflops``
(default 40: the paper's 39 h on 8 A100s for 400 epochs of ViT-B/16 MILAN). Evaluation is not
included. CPU cells report no GPU-hours.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from harness.grid import Grid


@functools.cache
def count_images(folder: Path) -> int | None:
    """Files in an ImageFolder split (class sub-folders), or None when it is not there."""
    if not folder.is_dir():
        return None
    return sum(sum(1 for f in os.scandir(d.path) if f.is_file())
               for d in os.scandir(folder) if d.is_dir())


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
        images = count_images(Path(cfg.data.root) / cfg.data.train_split) or est.train_images
        if images is None:
            out[cell.run_id] = None
            continue
        flops = train_flops_per_image(cfg.model, cfg.teacher) * images * cfg.pretrain.epochs
        out[cell.run_id] = flops / (est.sustained_tflops * 1e12) / 3600
    return out
