"""One optimizer step of a group of students on one data stream, as the pretraining loop runs it and
the speed benchmark times it (a run alone is a group of one).

Per micro-batch: the frozen teacher once (when some student needs it), the masks once per mask
sampling and patch count (:func:`draw_masks`), then every student's forward and backward. Then every
student's optimizer step (fused AdamW, optional gradient clipping). No host synchronisation: the
losses stay on the device until the loop reads a window of them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from harness.milan.masking import draw_ids_shuffle, mask_generator, stream_of
from harness.milan.pretrainer import MilanPretrainer
from harness.milan.switches import needs_teacher
from harness.milan.teacher import ClipTeacher, TeacherOutput


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    """The pretraining precision policy: bf16 autocast on CUDA (``auto`` or ``bf16``); fp32 on the CPU
    unless ``bf16`` is asked for (bf16 matmuls are slower than fp32 on the CPUs this runs on)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def allow_tf32(device: torch.device) -> None:
    """TF32 for the matmuls and convolutions that run in fp32 on CUDA (outside bf16 autocast)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_optimizer(model: MilanPretrainer, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    # The authors' groups (timm's add_weight_decay, no skip list): biases and 1-d parameters are
    # exempt, everything else decays, cls_token and mask_token ([1, 1, C]) included.
    groups = param_groups_weight_decay(model.student, weight_decay)
    # fused AdamW is several times faster than the per-tensor loop, on CPU as on CUDA
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, fused=True)


class SectionTimer:
    """Seconds spent in timed sections, read after a device sync: CUDA events on GPUs (no sync of
    their own), the wall clock on CPUs."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: float | torch.cuda.Event = 0.0

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start

    def take(self) -> float:
        """The seconds timed since the last take (after a device sync), and start again from 0."""
        total = self.seconds + sum(a.elapsed_time(b) for a, b in self._spans) / 1000
        self.seconds, self._spans = 0.0, []
        return total


class Learner(Protocol):
    """What a step needs of a student: its objective (``train_model``: the model, compiled or wrapped
    for DDP), optimizer, clipping and timer."""

    model: MilanPretrainer
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    clip_grad: float | None
    precision: str
    watch: SectionTimer


@dataclass
class StepCounts:
    """What one step loaded and ran through the teacher (images on this rank), and each learner's
    loss (on the device)."""

    losses: list[torch.Tensor]
    images: int = 0
    teacher_images: int = 0


def draw_masks(learners: Sequence[Learner], imgs: torch.Tensor, teacher_out: TeacherOutput | None, seed: int,
               step: int, micro: int, rank: int) -> dict[tuple[str, int], torch.Tensor]:
    """One micro-batch's masks (``ids_shuffle``) per (mask sampling, number of patches) the learners
    use, each drawn once from a generator of (seed, step, micro-batch, rank): learners of one sampling
    share it (a ratio keeps a prefix), alone or in a group."""
    masks: dict[tuple[str, int], torch.Tensor] = {}
    for learner in learners:
        key = (learner.model.masking, learner.model.student.num_patches)
        if key in masks:
            continue
        generator = mask_generator(seed, step, micro, rank, stream=stream_of(key[0]), device=imgs.device)
        masks[key] = draw_ids_shuffle(key[0], batch_size=imgs.shape[0], num_patches=key[1], device=imgs.device,
                                      generator=generator,
                                      importance=teacher_out.importance if teacher_out is not None else None)
    return masks


def train_step(learners: Sequence[Learner], micro_batches: Iterable[torch.Tensor], *, teacher: ClipTeacher | None,
               teacher_precision: str, lrs: Sequence[float], seed: int, step: int, rank: int = 0,
               accum_steps: int = 1, distributed: bool = False, teacher_timer: SectionTimer | None = None
               ) -> StepCounts:
    """One optimizer step of ``learners`` on ``accum_steps`` micro-batches (images already on the
    device), each learner at its learning rate in ``lrs``."""
    for learner, lr in zip(learners, lrs):
        for group in learner.optimizer.param_groups:
            group["lr"] = lr
    device = next(learner.model.parameters()).device
    counts = StepCounts([torch.zeros((), device=device) for _ in learners])
    wants_teacher = teacher is not None and any(needs_teacher(lr.model.target, lr.model.masking) for lr in learners)
    for micro, imgs in enumerate(micro_batches):
        counts.images += imgs.shape[0]
        teacher_out = None
        if wants_teacher:
            if teacher_timer is not None:
                teacher_timer.start()
            with autocast_for(teacher_precision, device):
                teacher_out = teacher(imgs)
            if teacher_timer is not None:
                teacher_timer.stop()
            counts.teacher_images += imgs.shape[0]
        masks = draw_masks(learners, imgs, teacher_out, seed, step, micro, rank)
        sync = micro == accum_steps - 1 or not distributed
        for k, learner in enumerate(learners):
            learner.watch.start()
            ids = masks[(learner.model.masking, learner.model.student.num_patches)]
            with (nullcontext() if sync else learner.train_model.no_sync()), autocast_for(learner.precision, device):
                loss = learner.train_model(imgs, ids, teacher_out=teacher_out).loss
            (loss / accum_steps).backward()
            counts.losses[k] += loss.detach() / accum_steps
            learner.watch.stop()
    for learner in learners:
        learner.watch.start()
        if learner.clip_grad:
            torch.nn.utils.clip_grad_norm_(learner.model.student.parameters(), learner.clip_grad)
        learner.optimizer.step()
        learner.optimizer.zero_grad(set_to_none=True)
        learner.watch.stop()
    return counts
