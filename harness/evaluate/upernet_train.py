"""End-to-end UperNet fine-tuning of a pretrained encoder on a segmentation tree, and its
sliding-window evaluation: the BEiT/MAE ADE20K protocol (:mod:`harness.evaluate.upernet` for the
model, :mod:`harness.data.segmentation` for the data)."""

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from harness.core.tensor_files import load_tensors, save_atomic
from harness.data.sampler import ResumableSampler, SeededSamples, sample_key
from harness.data.segmentation import IGNORE
from harness.evaluate.features import autocast
from harness.evaluate.miou import confusion_matrix, segmentation_scores, summed_over_ranks
from harness.evaluate.upernet import ViTUperNet

log = logging.getLogger(__name__)

AUX_WEIGHT = 0.4  # mmseg's FCNHead loss weight in BEiT's and MAE's configs
WARMUP_RATIO = 1e-6  # the warm-up starts at this fraction of the lr
BETAS = (0.9, 0.999)
SLIDE_STRIDE = 2 / 3  # of the crop: 341 for 512


def finetune_upernet(
    encoder: VisionTransformer,
    train_set: Dataset,
    val_set: Dataset,
    *,
    num_classes: int,
    crop_size: int,
    iterations: int,
    batch_size: int,
    lr: float,
    warmup_iterations: int,
    layer_decay: float,
    weight_decay: float,
    drop_path: float,
    channels: int,
    num_workers: int,
    device: torch.device,
    seed: int = 0,
    checkpoint: Path | None = None,
    checkpoint_every: int = 1000,
    on_checkpoint: Callable[[int, float], None] = lambda iteration, loss: None,
) -> dict[str, float]:
    """Fine-tune UperNet on ``encoder`` for ``iterations`` steps of ``batch_size`` crops and score
    the validation set: "seg_upernet_miou", "seg_upernet_pixel_accuracy" (percent) and
    "seg_upernet_train_seconds", on rank 0 (the other ranks return {}).

    Recipe (mmseg's MAE ViT-B config, BEiT's before it): AdamW (betas 0.9/0.999) with layer-wise lr
    decay, a linear warm-up from 1e-6 x lr over ``warmup_iterations``, then poly decay (power 1) to
    0 over all the iterations; cross-entropy ignoring unlabelled pixels, on the decode head's
    logits upsampled to the crop plus 0.4 x the auxiliary head's; bf16 autocast on a GPU.

    ``train_set`` yields augmented crops (:func:`harness.data.segmentation.train_transform`); each
    item's augmentation is drawn from a key of (seed, epoch, position), so a resumed run sees the
    crops an uninterrupted one sees. In a torch.distributed job every rank calls it: DDP (SyncBN on
    GPUs), each rank taking its share of every batch, and each rank scoring its share of
    ``val_set`` (whole images, :func:`slide_logits`); the confusion matrices are summed. With
    ``checkpoint``, rank 0 saves there every ``checkpoint_every`` iterations and at the end, and a
    call that finds the file continues from it; ``on_checkpoint(iteration, mean loss since the last
    one)`` on rank 0 after each save, and for the last saved one again on resuming.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise ValueError(f"the segmentation batch of {batch_size} does not split over {world} ranks")
    if len(train_set) < batch_size:
        raise ValueError(f"{len(train_set)} training images make no full batch of {batch_size}")
    per_rank = batch_size // world
    state = load_tensors(checkpoint) if checkpoint is not None and checkpoint.is_file() else {}
    if "metrics" in state:  # done before a requeue
        return state["metrics"] if rank == 0 else {}
    torch.manual_seed(seed)
    model = ViTUperNet(encoder, num_classes=num_classes, crop_size=crop_size, drop_path=drop_path,
                       channels=channels).to(device)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, layer_decay=layer_decay,
                                    betas=BETAS)
    scheduler = PolyLRScheduler(optimizer, t_initial=iterations, power=1.0, lr_min=0.0, warmup_t=warmup_iterations,
                                warmup_lr_init=lr * WARMUP_RATIO, t_in_epochs=False)
    iteration, train_seconds = 0, 0.0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        iteration, train_seconds = state["iteration"], state["train_seconds"]
        log.info("segmentation fine-tuning resumes at iteration %d of %d (%s)", iteration, iterations, checkpoint)
        if rank == 0:  # again, in case the kill came between its save and its report
            on_checkpoint(iteration, state["loss"])
    if world > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model

    steps_per_epoch = len(train_set) // batch_size
    sampler = ResumableSampler(len(train_set), steps_per_epoch * batch_size, seed=seed, rank=rank, world_size=world)
    loader = DataLoader(SeededSamples(train_set), batch_size=per_rank, sampler=sampler, num_workers=num_workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    while iteration < iterations:
        sampler.set_epoch(iteration // steps_per_epoch, (iteration % steps_per_epoch) * per_rank)
        for images, labels in loader:
            scheduler.step_update(iteration)
            torch.manual_seed(sample_key(seed, rank, iteration))  # drop path and dropout
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device):
                loss = upernet_loss(*trained(images), labels)
            if not math.isfinite(loss.item()):  # a diverged run must not report a score
                raise FloatingPointError(f"segmentation loss is {loss.item()} at iteration {iteration}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            iteration += 1
            if iteration % checkpoint_every == 0 or iteration == iterations:
                train_seconds += time.perf_counter() - start
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
                         "train_seconds": train_seconds, "loss": sum(losses) / len(losses)}
                if rank == 0:
                    if checkpoint is not None:
                        save_atomic(state, checkpoint)
                    on_checkpoint(iteration, state["loss"])
                losses, start = [], time.perf_counter()
            if iteration == iterations:
                break
    share = Subset(val_set, range(rank, len(val_set), world))
    confusion = summed_over_ranks(_confusion(model, share, num_classes, crop_size, device), device)
    if rank != 0:
        return {}
    scores = segmentation_scores(confusion)
    metrics = {"seg_upernet_miou": scores["miou"], "seg_upernet_pixel_accuracy": scores["pixel_accuracy"],
               "seg_upernet_train_seconds": train_seconds}
    if checkpoint is not None:  # done: a call after a requeue returns these
        save_atomic({**state, "metrics": metrics}, checkpoint)
    return metrics


def upernet_loss(logits: Tensor, aux: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the decode head's and (x 0.4) the auxiliary head's logits, each upsampled to
    the label map, unlabelled pixels ignored."""
    size = labels.shape[-2:]
    return F.cross_entropy(_upsample(logits, size), labels, ignore_index=IGNORE) \
        + AUX_WEIGHT * F.cross_entropy(_upsample(aux, size), labels, ignore_index=IGNORE)


def _upsample(logits: Tensor, size: torch.Size) -> Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.inference_mode()
def _confusion(model: ViTUperNet, images: Dataset, num_classes: int, crop: int, device: torch.device) -> Tensor:
    """The confusion matrix of ``images`` ((image at the evaluation scale, label map at its own
    size) pairs), each predicted whole in sliding windows, the logits resized to the label map."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for image, label in DataLoader(images, batch_size=None):
        def predict(window: Tensor) -> Tensor:
            with autocast(device):
                return _upsample(model(window.to(device))[0], window.shape[-2:]).float()
        logits = slide_logits(predict, image[None], crop, num_classes)
        prediction = _upsample(logits, label.shape[-2:]).argmax(1)[0]
        confusion += confusion_matrix(prediction.cpu(), label, num_classes)
    return confusion


def slide_logits(predict: Callable[[Tensor], Tensor], image: Tensor, crop: int, num_classes: int) -> Tensor:
    """mmseg's sliding-window inference: windows of crop x crop at a stride of 2/3 of the crop
    (341 for 512) over ``image`` [1, 3, H, W] (padded with zeros where smaller than the crop), each
    window's logits added where it lies and divided by the windows covering each pixel ->
    [1, K, H, W]."""
    stride = max(1, round(crop * SLIDE_STRIDE))
    _, _, height, width = image.shape
    padded = F.pad(image, (0, max(0, crop - width), 0, max(0, crop - height)))
    full_h, full_w = padded.shape[-2:]
    rows = max(full_h - crop + stride - 1, 0) // stride + 1
    cols = max(full_w - crop + stride - 1, 0) // stride + 1
    logits = torch.zeros(1, num_classes, full_h, full_w)
    count = torch.zeros(1, 1, full_h, full_w)
    for row in range(rows):
        for col in range(cols):
            top, left = min(row * stride, full_h - crop), min(col * stride, full_w - crop)
            window = padded[:, :, top:top + crop, left:left + crop]
            logits[:, :, top:top + crop, left:left + crop] += predict(window).cpu()
            count[:, :, top:top + crop, left:left + crop] += 1
    return (logits / count)[:, :, :height, :width]
