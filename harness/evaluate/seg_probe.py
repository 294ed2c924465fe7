"""The frozen segmentation probe: a linear (1x1) head on the frozen encoder's patch-token maps,
its logits upsampled to the label map, trained with cross-entropy; cheap enough for every cell of
a grid, as the linear probe is for classification.

Recipe (this project's choice; the MILAN paper reports no frozen segmentation probe): the maps of
the encoder's final norm at its own input size (the shorter side resized to it, the central
square), BatchNorm without affine parameters then a 1x1 convolution (MAE's linear-probe head made
dense), bilinear upsampling to the label map, AdamW with a half-cycle cosine lr to 0.
"""

import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from harness.core.tensor_files import load_tensors, save_atomic
from harness.data.segmentation import IGNORE
from harness.evaluate.miou import confusion_matrix, segmentation_scores, summed_over_ranks


def probe_head(width: int, num_classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm2d(width, affine=False, eps=1e-6), nn.Conv2d(width, num_classes, kernel_size=1))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def segmentation_probe(
    train_maps: Tensor,
    train_labels: Tensor,
    val_maps: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    seed: int = 0,
    checkpoint: Path | None = None,
) -> dict[str, float]:
    """Train the probe on frozen maps ([N, D, h, w]) against label maps ([N, H, W], ``IGNORE``
    unlabelled) and score the validation maps: "seg_linear_miou", "seg_linear_pixel_accuracy"
    (percent) and "seg_linear_train_seconds" on rank 0 (the other ranks return {}).

    In a torch.distributed job every rank calls it with all the maps: each epoch's shuffle is the
    same on every rank, each rank takes its share of every batch and the head trains with DDP; each
    rank scores its share of the validation maps and the confusion matrices are summed. With
    ``checkpoint``, rank 0 saves the head and optimizer after every epoch, and a call that finds the
    file continues after its last epoch with the same result; at the end it holds the metrics too.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise ValueError(f"the segmentation-probe batch of {batch_size} does not split over {world} ranks")
    if len(train_maps) < batch_size:
        raise ValueError(f"{len(train_maps)} training images make no full batch of {batch_size}")
    state = load_tensors(checkpoint) if checkpoint is not None and checkpoint.is_file() else {}
    if "metrics" in state:  # done before a requeue
        return state["metrics"] if rank == 0 else {}
    torch.manual_seed(seed)
    head = probe_head(train_maps.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(train_maps) // batch_size  # full batches only, as the linear probe
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, t_in_epochs=False)
    first_epoch, train_seconds = 0, 0.0
    if state:
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch, train_seconds = state["epoch"], state["train_seconds"]
    trained = DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else head
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)
    for epoch in range(first_epoch, epochs):
        start = time.perf_counter()
        head.train()
        order = torch.randperm(len(train_maps), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        for step, batch in enumerate(order[:steps_per_epoch * batch_size].split(batch_size)):
            scheduler.step_update(epoch * steps_per_epoch + step)
            mine = batch[rank::world]
            maps = train_maps[mine].to(device, torch.float32, non_blocking=True)
            labels = train_labels[mine].to(device, torch.long, non_blocking=True)
            loss = criterion(F.interpolate(trained(maps), size=labels.shape[-2:], mode="bilinear",
                                           align_corners=False), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_seconds += time.perf_counter() - start
        state = {"head": head.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "train_seconds": train_seconds}
        if rank == 0 and checkpoint is not None:
            save_atomic(state, checkpoint)
    confusion = summed_over_ranks(_confusion(head, val_maps[rank::world], val_labels[rank::world], num_classes,
                                             batch_size, device), device)
    if rank != 0:
        return {}
    scores = segmentation_scores(confusion)
    metrics = {"seg_linear_miou": scores["miou"], "seg_linear_pixel_accuracy": scores["pixel_accuracy"],
               "seg_linear_train_seconds": train_seconds}
    if checkpoint is not None:
        save_atomic({**state, "metrics": metrics}, checkpoint)
    return metrics


@torch.inference_mode()
def _confusion(head: nn.Module, maps: Tensor, labels: Tensor, num_classes: int, batch_size: int,
               device: torch.device) -> Tensor:
    head.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for batch_maps, batch_labels in zip(maps.split(batch_size), labels.split(batch_size)):
        logits = head(batch_maps.to(device, torch.float32))
        predictions = F.interpolate(logits, size=batch_labels.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(predictions.argmax(1).cpu(), batch_labels.long(), num_classes)
    return confusion
