"""Dry-run cost estimate: GPU-hours of a cell's pretraining.

FLOPs per training image are counted by torch's ``FlopCounterMode`` on the meta device (no
memory, no arithmetic, about a second per distinct model): the student's forward and backward
on one image, plus the frozen teacher's forward where the cell needs one (its visual tower in
train mode: in eval mode the counter misses the fused attention path). GPU-hours =
FLOPs/image x images/epoch x epochs / (sustained FLOP/s per GPU) / 3600, with the rate from
the grid's ``estimate.sustained_tflops`` (default 40: the paper's 39 h on 8 A100s for 400
epochs of ViT-B/16 MILAN). Evaluation is not included. CPU cells report no GPU-hours.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from harness.config import RunConfig
from harness.grid import Grid


@functools.cache
def _flops(size: str, img_size: int, decoder: str, mask_ratio: float, decoder_width: int | None,
           decoder_depth: int | None, decoder_heads: int | None, teacher: str | None) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from harness.milan import build_student

    with torch.device("meta"):
        teacher_flops, pred_dim = 0.0, 1
        if teacher is not None:
            import open_clip

            from harness.milan.teacher import resolve_model_name

            root = logging.getLogger()
            level, root.level = root.level, logging.ERROR  # "no pretrained weights loaded": none needed
            try:
                visual = open_clip.create_model(resolve_model_name(teacher), device="meta").visual.train()
            finally:
                root.setLevel(level)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                visual(torch.empty(1, 3, *visual.image_size))
            teacher_flops, pred_dim = counter.get_total_flops(), visual.output_dim
        student = build_student(size, img_size=img_size, decoder=decoder, pred_dim=pred_dim,
                                mask_ratio=mask_ratio, decoder_embed_dim=decoder_width,
                                decoder_depth=decoder_depth, decoder_num_heads=decoder_heads).train()
        ids = torch.empty(1, student.num_patches, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            pred, _ = student(torch.empty(1, 3, img_size, img_size), ids)
            pred.float().sum().backward()
    return float(counter.get_total_flops()) + teacher_flops


def train_flops_per_image(cfg: RunConfig) -> float:
    """Training FLOPs per image: student forward + backward, teacher forward if any."""
    from harness.milan import needs_teacher

    m = cfg.model
    teacher = cfg.teacher.model if needs_teacher(m.target, m.masking) else None
    return _flops(m.size, m.img_size, m.decoder, m.mask_ratio, m.decoder_width, m.decoder_depth,
                  m.decoder_heads, teacher)


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
    out: dict[str, float | str | None] = {}
    for cell in grid.cells:
        cfg = cell.config
        images = count_images(Path(cfg.data.root) / cfg.data.train_split) or est.train_images
        if images is None:
            out[cell.run_id] = None
            continue
        flops = train_flops_per_image(cfg) * images * cfg.pretrain.epochs
        out[cell.run_id] = flops / (est.sustained_tflops * 1e12) / 3600
    return out
