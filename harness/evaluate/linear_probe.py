"""MAE/MILAN linear probing: a BatchNorm + linear head trained on frozen cls-token features."""

import time
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from timm.utils import AverageMeter, accuracy
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from harness.core.tensor_files import load_tensors, save_atomic


def linear_probe_on_features(
    train_features: Tensor,
    train_labels: Tensor,
    val_features: Tensor,
    val_labels: Tensor,
    *,
    num_classes: int,
    epochs: int,
    batch_size: int,
    base_lr: float,
    warmup_epochs: float,
    weight_decay: float = 0.0,
    optimizer: Literal["lars", "sgd"] = "lars",
    device: torch.device,
    seed: int = 0,
    checkpoint: Path | None = None,
) -> dict[str, float]:
    """Train a linear classifier on frozen cls-token features and report validation accuracy.

    Recipe (MAE, used by MILAN): head = BatchNorm1d(affine=False, eps=1e-6) + Linear (weight
    trunc_normal std 0.01, bias 0); lr = base_lr * batch_size / 256 with a per-iteration linear
    warm-up and half-cycle cosine to 0; LARS with momentum 0.9 (SGD with momentum 0.9 as an option).
    The head trains on the features (extracted once, e.g. shared with k-NN), `batch_size` at a time;
    `seed` fixes its initialisation and the order of the feature batches. Returns "linear_top1",
    "linear_top5" (at least 5 classes), percentages, and "linear_train_seconds" (fitting the head). In a torch.distributed job every rank calls it with all the features: each
    epoch's shuffle is the same on every rank, each rank takes its share of every batch of
    `batch_size` and the head trains with DDP (its BatchNorm normalises per rank, as in MAE's
    probe); rank 0 evaluates, the other ranks return {}. With `checkpoint`, rank 0 saves the head,
    optimizer and shuffle state after every epoch, and a call that finds the file continues after
    its last epoch (a requeued job) with the same result; at the end it holds the metrics too.
    """
    if optimizer not in ("lars", "sgd"):
        raise ValueError(f"optimizer must be 'lars' or 'sgd', not {optimizer!r}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise ValueError(f"the linear-probe batch of {batch_size} does not split over {world} ranks")
    state = load_tensors(checkpoint) \
        if checkpoint is not None and checkpoint.is_file() else {}
    if "metrics" in state:  # done before a requeue
        return state["metrics"] if rank == 0 else {}
    generator = torch.Generator().manual_seed(seed)
    head = _probe_head(train_features.shape[1], num_classes, generator).to(device)
    opt = _head_optimizer(head, optimizer, base_lr * batch_size / 256, weight_decay)
    first_epoch, train_seconds = 0, 0.0
    if state:
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        first_epoch, train_seconds = state["epoch"], state["train_seconds"]
    trained = DistributedDataParallel(head, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else head
    features, labels = train_features.to(device), train_labels.to(device)
    steps_per_epoch = max(len(features) // batch_size, 1)
    schedule = _schedule(opt, epochs, steps_per_epoch, warmup_epochs)
    head.train()
    for epoch in range(first_epoch, epochs):
        start = time.perf_counter()
        for step, batch in enumerate(_epoch_batches(len(features), batch_size, generator), epoch * steps_per_epoch):
            mine = batch[rank::world].to(device)
            schedule.step_update(step)
            loss = F.cross_entropy(trained(features[mine]), labels[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds += time.perf_counter() - start
        state = {"head": head.state_dict(), "optimizer": opt.state_dict(), "generator": generator.get_state(),
                 "epoch": epoch + 1, "train_seconds": train_seconds}
        if rank == 0 and checkpoint is not None:
            save_atomic(state, checkpoint)
    if rank != 0:
        return {}
    metrics = _evaluate_head(head, val_features, val_labels, batch_size, device)
    if num_classes < 5:
        del metrics["linear_top5"]
    metrics = {**metrics, "linear_train_seconds": train_seconds}
    if checkpoint is not None:  # done: a call after a requeue returns these
        save_atomic({**state, "metrics": metrics}, checkpoint)
    return metrics


def _probe_head(embed_dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """MAE's probe head; its parameter-free BatchNorm evens out feature scales across models."""
    linear = nn.Linear(embed_dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6), linear)


def _head_optimizer(
    head: nn.Sequential, name: Literal["lars", "sgd"], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """LARS or SGD, momentum 0.9, weight decay on the weight matrix only (as MAE's LARS)."""
    linear = head[1]
    decay = {"params": [linear.weight], "weight_decay": weight_decay}
    no_decay = {"params": [linear.bias], "weight_decay": 0.0}
    if name == "lars":
        # MAE's LARS scales every matrix's step by its trust ratio even at zero weight decay and
        # leaves 1-D parameters alone; timm's Lars only adapts a group with weight decay unless
        # always_adapt is set, which would silently turn the recipe (decay 0) into plain SGD.
        return Lars([{**decay, "always_adapt": True}, no_decay], lr=lr, momentum=0.9)
    return torch.optim.SGD([decay, no_decay], lr=lr, momentum=0.9)


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch: a fresh shuffle of the n cached features in full batches of indices (a set
    smaller than one batch is used whole): a ragged last batch would get a noisy BatchNorm estimate."""
    num_batches = max(n // batch_size, 1)
    return list(torch.randperm(n, generator=generator)[: num_batches * batch_size].split(batch_size))


def _schedule(optimizer: torch.optim.Optimizer, epochs: int, steps_per_epoch: int,
              warmup_epochs: float) -> CosineLRScheduler:
    """Per-iteration linear warm-up, then half-cycle cosine to 0."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    return CosineLRScheduler(optimizer, t_initial=max(epochs * steps_per_epoch - warmup_steps, 1),
                             warmup_t=warmup_steps, warmup_prefix=True, t_in_epochs=False)


@torch.inference_mode()
def _evaluate_head(
    head: nn.Sequential, features: Tensor, labels: Tensor, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent of the head on cached validation features."""
    head.eval()
    top1, top5 = AverageMeter(), AverageMeter()
    for batch_features, batch_labels in zip(
        features.split(batch_size), labels.split(batch_size), strict=True
    ):
        logits = head(batch_features.to(device))
        acc1, acc5 = accuracy(logits, batch_labels.to(device), topk=(1, 5))
        top1.update(acc1.item(), len(batch_labels))
        top5.update(acc5.item(), len(batch_labels))
    return {"linear_top1": top1.avg, "linear_top5": top5.avg}
