"""Training FLOPs per image of one MILAN cell: the student's forward and backward on one image, plus
the frozen teacher's forward where the cell needs one; and of a group of cells that share the
teacher (:mod:`harness.config.student_side`): every student's, plus one teacher forward.

Counted by torch's ``FlopCounterMode`` on the meta device (no memory, no arithmetic, about a second
per distinct model). The teacher's visual tower runs in train mode: in eval mode the counter misses
its fused attention path.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Protocol

import open_clip
import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.milan.model import build_student
from harness.milan.switches import DecoderKind, Masking, Target, needs_teacher
from harness.milan.teacher import resolve_model_name


class ModelFields(Protocol):
    """What a count reads of a run config's ``model`` section."""

    size: str
    img_size: int
    target: Target
    decoder: DecoderKind
    masking: Masking
    mask_ratio: float
    decoder_width: int | None
    decoder_depth: int | None
    decoder_heads: int | None


class TeacherFields(Protocol):
    """What a count reads of a run config's ``teacher`` section."""

    model: str


def train_flops_per_image(model: ModelFields, teacher: TeacherFields) -> float:
    """FLOPs of one training image for a config's ``model`` and ``teacher`` sections."""
    return sum(_split(model, teacher))


def group_flops_per_image(sections: Sequence[tuple[ModelFields, TeacherFields]]) -> float:
    """FLOPs of one training image for a group job: each student's, and the teacher's once when
    any student needs it (the group shares one teacher config)."""
    splits = [_split(model, teacher) for model, teacher in sections]
    return sum(student for student, _ in splits) + max(teacher for _, teacher in splits)


def _split(model: ModelFields, teacher: TeacherFields) -> tuple[float, float]:
    """(student forward + backward, teacher forward or 0) FLOPs per image."""
    return _count(model.size, model.img_size, model.decoder, model.mask_ratio, model.decoder_width,
                  model.decoder_depth, model.decoder_heads,
                  teacher.model if needs_teacher(model.target, model.masking) else None)


@functools.cache
def _count(size: str, img_size: int, decoder: str, mask_ratio: float, decoder_width: int | None,
           decoder_depth: int | None, decoder_heads: int | None, teacher: str | None) -> tuple[float, float]:
    with torch.device("meta"):
        teacher_flops, pred_dim = 0.0, 1
        if teacher is not None:
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
    return float(counter.get_total_flops()), float(teacher_flops)
