"""Evaluation spread over a job's ranks: feature extraction in shards kept on disk (so that a
requeued job does not redo it), and per-rank accuracies combined into the whole set's.

Rank ``r`` of ``w`` takes every ``w``-th item from ``r`` on: the shards cover the data set exactly
once, without the padding a ``DistributedSampler`` adds. Each rank writes its shard to a file and
then reads them all back in data-set order; no features go through a collective, so no rank waits
in one for longer than the slowest rank's extraction.
"""

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from harness.evaluate.features import extract_features
from harness.core.tensor_files import load_tensors, save_atomic


def shard_path(folder: Path, name: str, rank: int, world: int) -> Path:
    return folder / f"{name}-{rank}of{world}.pt"


def sharded_features(
    encoder: VisionTransformer,
    dataset: Dataset,
    *,
    rank: int,
    world: int,
    folder: Path,
    name: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    wait: Callable[[], None] = lambda: None,
    extract: Callable[..., tuple[Tensor, Tensor]] = extract_features,
) -> tuple[Tensor, Tensor]:
    """Extract this rank's shard of ``dataset`` into ``folder`` with ``extract(encoder, loader,
    device)`` (unless an earlier attempt did), ``wait()`` for the other ranks (a barrier), then
    read every shard and return (features, labels) of the whole data set in its order (any
    shapes and dtypes ``extract`` gives per item)."""
    path = shard_path(folder, name, rank, world)
    if not path.is_file():
        indices = list(range(rank, len(dataset), world))
        features, labels = torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        if indices:
            loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                                num_workers=num_workers)
            features, labels = extract(encoder, loader, device)
        save_atomic({"features": features, "labels": labels, "indices": torch.tensor(indices, dtype=torch.long)}, path)
    wait()
    shards = [load_tensors(shard_path(folder, name, r, world)) for r in range(world)]
    shards = [s for s in shards if s["indices"].numel()]
    order = torch.cat([s["indices"] for s in shards])
    if not torch.equal(order.sort().values, torch.arange(len(dataset))):
        raise RuntimeError(f"the {name} feature shards in {folder} do not cover its {len(dataset)} items exactly "
                           "once: delete the folder to extract them again")
    first = shards[0]
    features = torch.empty(len(dataset), *first["features"].shape[1:], dtype=first["features"].dtype)
    labels = torch.empty(len(dataset), *first["labels"].shape[1:], dtype=first["labels"].dtype)
    features[order] = torch.cat([s["features"] for s in shards])
    labels[order] = torch.cat([s["labels"] for s in shards])
    return features, labels


def average_over_ranks(metrics: dict[str, float], count: int, device: torch.device) -> dict[str, float]:
    """Each rank's averages over its ``count`` items -> the averages over every rank's items, on
    every rank (one all-reduce). Outside a torch.distributed job, ``metrics`` as they are."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    totals = torch.tensor([metrics[k] * count for k in keys] + [count], dtype=torch.float64,
                          device=device if device.type == "cuda" else "cpu")  # NCCL reduces CUDA tensors
    dist.all_reduce(totals)
    return {k: (totals[i] / totals[-1]).item() if totals[-1] else float("nan") for i, k in enumerate(keys)}
