"""``seg_upernet`` training throughput here, and the cost of the paper's ADE20K schedule.

The measured part runs the protocol's own training step (UperNet on the preset's ViT, its loss
and its layer-decayed AdamW: :mod:`harness.evaluate.upernet_train`) on synthetic crops and
counts images per second. The estimate counts the FLOPs of one ViT-B/16 UperNet training image
at 512 x 512 (FlopCounterMode on the meta device: no memory, no time) and divides the schedule's
160k iterations x 16 crops by assumed sustained rates: labelled estimates, not measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from timm.optim import create_optimizer_v2
from torch.utils.flop_counter import FlopCounterMode

from harness.evaluate.features import autocast
from harness.evaluate.protocols.segmentation import ADE20K_CLASSES
from harness.evaluate.upernet import ViTUperNet
from harness.evaluate.upernet_train import upernet_loss
from harness.milan.weights import build_timm_vit

PAPER_ITERATIONS, PAPER_BATCH, PAPER_CROP = 160_000, 16, 512
# Sustained rates the estimate assumes, per GPU (TFLOP/s): this project's dry-run assumption for an
# A100 (it reproduces MILAN's reported 39 h pretraining on 8 A100s), and the eager rate of the
# MILAN pretraining step measured on an H200 (27% of its measured 749 TFLOP/s bf16 peak;
# docs/measurements), for H100-class GPUs.
ASSUMED_TFLOPS = {"A100 (40 TFLOP/s sustained)": 40.0, "H100 (200 TFLOP/s sustained)": 200.0}


@dataclass(frozen=True)
class SegSpeed:
    images_per_s: float
    seconds_per_iteration: float
    flops_per_image: float  # forward + backward of one training crop

    @property
    def tflops(self) -> float:
        return self.images_per_s * self.flops_per_image / 1e12


def _model(size: str, crop: int, channels: int, num_classes: int) -> ViTUperNet:
    return ViTUperNet(build_timm_vit(size, crop), num_classes=num_classes, crop_size=crop, drop_path=0.1,
                      channels=channels)


def training_flops(size: str, crop: int, channels: int, num_classes: int = ADE20K_CLASSES) -> float:
    """FLOPs of one training crop (forward and backward), counted on the meta device."""
    with torch.device("meta"):
        model = _model(size, crop, channels, num_classes)
        images = torch.empty(2, 3, crop, crop)
        labels = torch.zeros(2, crop, crop, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            upernet_loss(*model(images), labels).backward()
    return counter.get_total_flops() / 2


def measure(size: str, crop: int, batch: int, channels: int, iterations: int, device: torch.device,
            num_classes: int = ADE20K_CLASSES) -> SegSpeed:
    """Images/s of ``iterations`` timed training steps (after two untimed ones) on synthetic crops."""
    torch.manual_seed(0)
    model = _model(size, crop, channels, num_classes).to(device).train()
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, layer_decay=0.65, betas=(0.9, 0.999))
    images = torch.randn(batch, 3, crop, crop, device=device)
    labels = torch.randint(0, num_classes, (batch, crop, crop), device=device)

    def step() -> None:
        with autocast(device):
            loss = upernet_loss(*model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / iterations
    return SegSpeed(batch / seconds, seconds, training_flops(size, crop, channels, num_classes))


def paper_schedule_flops() -> float:
    """FLOPs of 160k iterations x 16 crops of ViT-B/16 UperNet (head width 768) at 512 x 512."""
    return training_flops("vit_base_patch16", PAPER_CROP, 768) * PAPER_ITERATIONS * PAPER_BATCH


def gpu_hours(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12) / 3600
