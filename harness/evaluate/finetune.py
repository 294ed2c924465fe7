"""MAE/MILAN end-to-end fine-tuning of a pretrained encoder, and its training transform."""

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.data.auto_augment import RandAugment
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import AverageMeter, accuracy, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from harness.evaluate.backbone import vit_like
from harness.evaluate.features import autocast
from harness.evaluate.shards import average_over_ranks
from harness.core.tensor_files import load_tensors, save_atomic

log = logging.getLogger(__name__)


def finetune_transform(
    img_size: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    randaug: str = "rand-m9-mstd0.5-inc1",
    reprob: float = 0.25,
) -> Callable:
    """MAE's fine-tuning augmentation: RandomResizedCrop (bicubic) + flip + RandAugment + random
    erasing, as timm builds it. Works for tiny images too (RandAugment scales its translations by
    the image size)."""
    transform = create_transform(
        input_size=img_size,
        is_training=True,
        color_jitter=None,  # MAE passes none; timm ignores colour jitter with RandAugment anyway
        auto_augment=randaug,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(mean),
        std=tuple(std),
    )
    for step in transform.transforms:
        for op in step.ops if isinstance(step, RandAugment) else ():
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: object) -> Image.Image:
    """timm's posterize, keeping 0 bits as the Pillow of MAE's time did (a black image) where
    Pillow >= 11 raises. timm's "inc" posterize keeps 0 bits at magnitude 10, which
    rand-m9-mstd0.5 draws for about 2% of the images it posterizes: the recipe crashed mid-epoch."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def finetune(
    encoder: VisionTransformer,
    train_dataset: Dataset,
    val_loader: DataLoader,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    base_lr: float,
    warmup_epochs: float,
    layer_decay: float = 0.65,
    drop_path: float = 0.1,
    weight_decay: float = 0.05,
    mixup: float = 0.8,
    cutmix: float = 1.0,
    label_smoothing: float = 0.1,
    num_workers: int = 0,
    device: torch.device,
    seed: int = 0,
    checkpoint: Path | None = None,
    on_epoch: Callable[[int, float], None] = lambda epoch, loss: None,
) -> dict[str, float]:
    """Fine-tune a copy of the encoder end to end and report validation accuracy.

    Recipe (MAE, used by MILAN): the encoder's weights in a fresh ViT that classifies the average of
    the patch tokens after a new LayerNorm; stochastic depth; AdamW with layer-wise lr decay (no
    weight decay on biases, norms, pos_embed and tokens); lr = base_lr * batch_size / 256 with a
    per-iteration linear warm-up and half-cycle cosine to 0; Mixup/CutMix with label smoothing and a
    soft-target loss (plain label-smoothed cross-entropy when both are 0); no gradient clipping.

    In a torch.distributed job every rank calls it: the model trains with DDP, each rank on its
    share of every shuffled batch of `batch_size` (the effective batch); each rank evaluates its
    `val_loader` (its share of the validation set) and the accuracies are combined. Rank 0
    returns them, the other ranks {}. Random state (Mixup, drop path, augmentation workers) is seeded from
    `seed`, the rank and the epoch at each epoch's start, as MAE seeds with `seed + rank`.

    With `checkpoint`, rank 0 saves the model and optimizer there after every epoch, and a call that
    finds the file continues after its last epoch (a requeued job), with the same result as an
    uninterrupted call; at the end the file also holds the metrics, which a later call returns. `on_epoch(epoch,
    mean loss)` on rank 0 after each epoch (1-based) is saved, and for the last saved one again on resuming.

    `train_dataset` yields augmented (image, label) pairs, e.g. with `finetune_transform`. The
    caller's encoder is not modified. Returns "finetune_top1", "finetune_top5" (at least 5 classes),
    percentages, and "finetune_train_seconds".
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise ValueError(f"the fine-tune batch of {batch_size} does not split over {world} ranks")
    per_rank = batch_size // world
    mixing = mixup > 0 or cutmix > 0
    if mixing and per_rank % 2:
        raise ValueError(f"Mixup/CutMix pair samples within a batch: {per_rank} per rank must be even")
    if len(train_dataset) < batch_size:
        raise ValueError(f"{len(train_dataset)} training samples make no full batch of {batch_size}")
    state = load_tensors(checkpoint) \
        if checkpoint is not None and checkpoint.is_file() else {}
    if "metrics" in state:  # done before a requeue
        return state["metrics"] if rank == 0 else {}
    random_seed(seed)
    model = _finetune_model(encoder, num_classes, drop_path).to(device)
    # One shuffled order of the whole set per epoch; rank r takes every world-th item of it, so
    # the ranks' batches k together are that order's batch k: the same steps as one process.
    sampler = DistributedSampler(train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(train_dataset, batch_size=per_rank, sampler=sampler, drop_last=True,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    optimizer = create_optimizer_v2(model, "adamw", lr=base_lr * batch_size / 256, weight_decay=weight_decay,
                                    layer_decay=layer_decay, fused=True)
    warmup_steps = round(warmup_epochs * len(loader))
    scheduler = CosineLRScheduler(optimizer, t_initial=max(epochs * len(loader) - warmup_steps, 1),
                                  warmup_t=warmup_steps, warmup_prefix=True, t_in_epochs=False)
    if mixing:
        mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    else:
        mix = None
        criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    first_epoch, train_seconds = 0, 0.0
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch, train_seconds = state["epoch"], state["train_seconds"]
        log.info("fine-tuning resumes after epoch %d of %d (%s)", first_epoch, epochs, checkpoint)
        if rank == 0 and "epoch_loss" in state:  # again, in case the kill came between its save and its report
            on_epoch(first_epoch, state["epoch_loss"])
    trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    model.train()
    step = first_epoch * len(loader)
    for epoch in range(first_epoch, epochs):
        start = time.perf_counter()
        random_seed(hash((seed, rank, epoch)) % 2**31)
        sampler.set_epoch(epoch)
        losses = []
        for images, labels in loader:
            scheduler.step_update(step)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, torch.long, non_blocking=True)
            if mix is not None:
                images, labels = mix(images, labels)
            with autocast(device):
                loss = criterion(trained(images), labels)
            # A diverged run must not report a garbage accuracy as a result (MAE stops here too).
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"fine-tuning loss is {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - start
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                 "train_seconds": train_seconds, "epoch_loss": sum(losses) / len(losses)}
        if rank == 0:
            if checkpoint is not None:
                save_atomic(state, checkpoint)
            on_epoch(epoch + 1, state["epoch_loss"])
    # each rank evaluates what its val_loader holds (in a job: its share of the validation set)
    metrics = average_over_ranks(_evaluate(model, val_loader, device), len(val_loader.dataset), device)
    if rank != 0:
        return {}
    if num_classes < 5:
        del metrics["finetune_top5"]
    metrics = {**metrics, "finetune_train_seconds": train_seconds}
    if checkpoint is not None:  # done: a call after a requeue returns these
        save_atomic({**state, "metrics": metrics}, checkpoint)
    return metrics


def _finetune_model(
    encoder: VisionTransformer, num_classes: int, drop_path: float
) -> VisionTransformer:
    """A fresh timm ViT shaped like `encoder`, with MAE's fine-tuning head, holding its weights.

    With fc_norm the ViT has no final `norm`: the pretrained one (which produced the cls feature
    the encoder was trained with) goes unused and the pooled patch tokens get a freshly initialised
    `fc_norm`, exactly as MAE's fine-tuning model does. The encoder's own classifier is dropped too.
    """
    model = vit_like(encoder, drop_path=drop_path, fresh=("fc_norm.", "head."), num_classes=num_classes,
                     global_pool="avg", fc_norm=True)
    # MAE's near-zero head: early updates then barely disturb the pretrained features.
    nn.init.trunc_normal_(model.head.weight, std=2e-5)
    nn.init.zeros_(model.head.bias)
    return model


@torch.inference_mode()
def _evaluate(
    model: VisionTransformer, loader: DataLoader, device: torch.device
) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent of the fine-tuned model over `loader`."""
    model.eval()
    top1, top5 = AverageMeter(), AverageMeter()
    for images, labels in loader:
        with autocast(device):
            logits = model(images.to(device, non_blocking=True))
        acc1, acc5 = accuracy(logits.float(), labels.to(device), topk=(1, 5))
        top1.update(acc1.item(), len(labels))
        top5.update(acc5.item(), len(labels))
    return {"finetune_top1": top1.avg, "finetune_top5": top5.avg}
