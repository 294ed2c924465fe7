"""One MILAN pretraining objective: teacher -> mask -> student -> loss.

The three ablation axes (:mod:`harness.milan.switches`) meet here:
- target ``pixel`` | ``clip``: what the decoder predicts and which loss applies;
- decoder ``standard`` | ``prompting``: chosen when the student is built;
- masking ``random`` | ``semantic``: how ``ids_shuffle`` is drawn when none is given, by the one
  dispatch :func:`harness.milan.masking.draw_ids_shuffle` (a group job draws its students' masks
  through it too, once per sampling).
The teacher is built whenever a cell needs it: for CLIP targets, for semantic masks, or both
(with a pixel target it only supplies the attention).
"""

from dataclasses import dataclass
from typing import get_args

import torch
from torch import nn

from harness.core.errors import ConfigError
from harness.milan.losses import clip_loss, patchify, pixel_loss
from harness.milan.masking import draw_ids_shuffle
from harness.milan.model import MaskedAutoencoderViT, build_student
from harness.milan.presets import PRESETS
from harness.milan.switches import DecoderKind, Masking, Target, needs_teacher
from harness.milan.teacher import ClipTeacher, TeacherOutput


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # scalar, float32
    pred: torch.Tensor  # [N, L+1, P]
    mask: torch.Tensor  # [N, L], 1 = masked
    ids_shuffle: torch.Tensor  # [N, L], the permutation used


class MilanPretrainer(nn.Module):
    """Student + optional frozen teacher; ``state_dict()`` of ``student`` is the checkpoint."""

    def __init__(self, student: MaskedAutoencoderViT, teacher: ClipTeacher | None, *,
                 target: Target, masking: Masking, norm_pix_loss: bool = True) -> None:
        super().__init__()
        if target not in get_args(Target):
            raise ConfigError(f"unknown target {target!r}: choose {' or '.join(get_args(Target))}")
        if masking not in get_args(Masking):
            raise ConfigError(f"unknown masking {masking!r}: choose {' or '.join(get_args(Masking))}")
        if teacher is None and needs_teacher(target, masking):
            raise ConfigError(f"target={target} with masking={masking} needs a CLIP teacher")
        if teacher is not None and tuple(teacher.grid_size) != tuple(student.grid_size):
            raise ConfigError(
                f"teacher and student patch grids differ: teacher {teacher.image_size}px / patch "
                f"{teacher.patch_size} gives {teacher.grid_size[0]}x{teacher.grid_size[1]}, student "
                f"{student.grid_size[0]}x{student.grid_size[1]}; choose a teacher with the student's "
                "patch size at the student's image size (or change model.img_size)")
        pred_dim = student.decoder_pred.out_features
        expected = teacher.embed_dim if target == "clip" else student.patch_size**2 * 3
        if pred_dim != expected:
            raise ConfigError(f"the student predicts {pred_dim} values per token but target={target} "
                              f"needs {expected}: build it with pred_dim={expected}")
        self.student = student
        self.teacher = teacher if needs_teacher(target, masking) else None
        self.target = target
        self.masking = masking
        self.norm_pix_loss = norm_pix_loss

    def forward(self, imgs: torch.Tensor, ids_shuffle: torch.Tensor | None = None,
                generator: torch.Generator | None = None,
                teacher_out: TeacherOutput | None = None) -> PretrainOutput:
        """imgs [N, 3, H, W]; ``ids_shuffle`` [N, L] to fix the mask, else it is drawn here;
        ``teacher_out``: the teacher's outputs on ``imgs`` when computed already (a group job
        runs the teacher once for all its students)."""
        if teacher_out is None and self.teacher is not None:
            teacher_out = self.teacher(imgs)
        if ids_shuffle is None:
            ids_shuffle = draw_ids_shuffle(self.masking, batch_size=imgs.shape[0], num_patches=self.student.num_patches,
                                           device=imgs.device, generator=generator,
                                           importance=teacher_out.importance if teacher_out is not None else None)
        pred, mask = self.student(imgs, ids_shuffle)
        if self.target == "clip":
            loss = clip_loss(pred, teacher_out.targets)
        else:
            loss = pixel_loss(pred[:, 1:], patchify(imgs, self.student.patch_size), mask,
                              self.norm_pix_loss)
        return PretrainOutput(loss=loss, pred=pred, mask=mask, ids_shuffle=ids_shuffle)


def build_pretrainer(*, size: str, img_size: int, target: Target, decoder: DecoderKind,
                     masking: Masking, mask_ratio: float, teacher: ClipTeacher | None,
                     norm_pix_loss: bool = True, decoder_embed_dim: int | None = None,
                     decoder_depth: int | None = None,
                     decoder_num_heads: int | None = None) -> MilanPretrainer:
    """Student sized from a preset, with the prediction head the target needs."""
    if target == "clip" and teacher is None:
        raise ConfigError("target=clip needs a CLIP teacher")
    patch = PRESETS[size].patch_size if size in PRESETS else 0
    pred_dim = teacher.embed_dim if target == "clip" else patch**2 * 3
    student = build_student(size, img_size=img_size, decoder=decoder, pred_dim=pred_dim,
                            mask_ratio=mask_ratio, decoder_embed_dim=decoder_embed_dim,
                            decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads)
    return MilanPretrainer(student, teacher, target=target, masking=masking,
                           norm_pix_loss=norm_pix_loss)
