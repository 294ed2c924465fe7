"""MAE/MILAN linear probing: a BatchNorm + linear head trained on frozen cls-token features."""

import time
from collections.abc import Iterator
from itertools import islice
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from timm.optim import Lars
from timm.scheduler import CosineLRScheduler
from timm.utils import AverageMeter, accuracy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from harness.evaluate.features import extract_features


def linear_probe(
    encoder: VisionTransformer,
    train_loader: DataLoader,
    val_loader: DataLoader,
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
) -> dict[str, float]:
    """Train a linear classifier on the frozen encoder's cls token and report validation accuracy.

    Recipe (MAE, used by MILAN): head = BatchNorm1d(affine=False, eps=1e-6) + Linear (weight
    trunc_normal std 0.01, bias 0); lr = base_lr * batch_size / 256 with a per-iteration linear
    warm-up and half-cycle cosine to 0; LARS with momentum 0.9 (SGD with momentum 0.9 as an option).

    The encoder runs once over each loader (which should use deterministic eval transforms) and
    the head trains on those features, `batch_size` at a time: see :func:`linear_probe_on_features`.
    The encoder is moved to `device` and never updated; its train/eval mode is restored. `seed`
    fixes the head's initialisation and the order of the feature batches.
    Returns "linear_top1", "linear_top5" (at least 5 classes), percentages, and
    "linear_train_seconds": wall time of fitting the head, including the train-feature pass.
    """
    start = time.perf_counter()
    features, labels = extract_features(encoder, train_loader, device)
    extract_seconds = time.perf_counter() - start
    metrics = linear_probe_on_features(
        features, labels, *extract_features(encoder, val_loader, device),
        num_classes=num_classes, epochs=epochs, batch_size=batch_size, base_lr=base_lr,
        warmup_epochs=warmup_epochs, weight_decay=weight_decay, optimizer=optimizer,
        device=device, seed=seed,
    )
    metrics["linear_train_seconds"] += extract_seconds
    return metrics


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
) -> dict[str, float]:
    """The cached-feature probe on features already extracted (e.g. shared with k-NN).

    Same recipe and return value as :func:`linear_probe`; "linear_train_seconds" covers fitting
    the head only.
    """
    if optimizer not in ("lars", "sgd"):
        raise ValueError(f"optimizer must be 'lars' or 'sgd', not {optimizer!r}")
    generator = torch.Generator().manual_seed(seed)
    head = _probe_head(train_features.shape[1], num_classes, generator).to(device)
    start = time.perf_counter()
    _train_head(
        head,
        _cached_batches(train_features.to(device), train_labels.to(device), batch_size, generator),
        epochs,
        max(len(train_features) // batch_size, 1),
        warmup_epochs,
        _head_optimizer(head, optimizer, base_lr * batch_size / 256, weight_decay),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - start
    metrics = _evaluate_head(head, val_features, val_labels, batch_size, device)
    if num_classes < 5:
        del metrics["linear_top5"]
    return {**metrics, "linear_train_seconds": train_seconds}


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


def _cached_batches(
    features: Tensor, labels: Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[Iterator[tuple[Tensor, Tensor]]]:
    """Per epoch, a fresh shuffle of the cached features in full batches (a set smaller than one
    batch is used whole): a ragged last batch would get a noisy BatchNorm estimate."""
    num_batches = max(len(features) // batch_size, 1)
    while True:
        order = torch.randperm(len(features), generator=generator).to(features.device)
        yield (
            (features[batch], labels[batch])
            for batch in order[: num_batches * batch_size].split(batch_size)
        )


def _train_head(
    head: nn.Sequential,
    batches: Iterator[Iterator[tuple[Tensor, Tensor]]],
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Cross-entropy training in fp32 (the head is tiny), per-iteration warm-up + cosine lr."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(epochs * steps_per_epoch - warmup_steps, 1),
        warmup_t=warmup_steps,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    head.train()
    step = 0
    for epoch in islice(batches, epochs):
        for features, labels in epoch:
            scheduler.step_update(step)
            loss = F.cross_entropy(head(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


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
