"""A sampler that can start an epoch part-way, so a resumed run sees exactly the data it would
have seen without the interruption."""

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Seeded shuffle per epoch, split across ranks, startable at any index of the epoch.

    Each epoch uses ``samples_per_epoch`` indices of a permutation drawn from ``seed`` and the
    epoch number (the remainder is dropped, as with ``drop_last``); rank ``r`` of ``w`` takes
    every ``w``-th of them. ``set_epoch(epoch, start)`` skips this rank's first ``start`` indices.
    """

    def __init__(self, dataset_size: int, samples_per_epoch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset_size = dataset_size
        self.samples_per_epoch = samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)[: self.samples_per_epoch]
        return iter(order[self.rank :: self.world_size][self.start :].tolist())

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size - self.start
