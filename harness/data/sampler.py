"""A training data stream as a pure function of (seed, epoch, position): which image comes at
each position of an epoch, and the random draws of its augmentation (the pretraining stream, and
the segmentation fine-tune's). A run resumed at any step, in
any number of DataLoader workers, sees exactly the crops and flips it would have seen without the
interruption.

Workers seeded once per loader (PyTorch's default) draw a worker's augmentations in sequence, so
after a resume mid-epoch the fresh workers would draw other crops: every sample is instead
augmented under a generator seeded from its own key (:class:`SeededSamples`).
"""

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from harness.data.datasets import DatasetError


def sample_key(seed: int, epoch: int, position: int) -> int:
    """The seed of the augmentation of the image at ``position`` of ``epoch``'s order."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + position) % (2**63 - 1)


class ResumableSampler(Sampler[tuple[int, int]]):
    """Seeded shuffle per epoch, split across ranks, startable at any index of the epoch.

    Each epoch uses ``samples_per_epoch`` positions of a permutation drawn from ``seed`` and the
    epoch number (the remainder is dropped, as with ``drop_last``); rank ``r`` of ``w`` takes
    every ``w``-th of them. ``set_epoch(epoch, start)`` skips this rank's first ``start`` positions.
    Yields ``(index, key)``: the image, and the key its augmentation draws from
    (:class:`SeededSamples`), a function of the position in the epoch, whatever the ranks.
    """

    def __init__(self, dataset_size: int, samples_per_epoch: int, *, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.dataset_size = dataset_size
        self.samples_per_epoch = samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator)[: self.samples_per_epoch].tolist()
        positions = range(self.rank, self.samples_per_epoch, self.world_size)[self.start:]
        return ((order[p], sample_key(self.seed, self.epoch, p)) for p in positions)

    def __len__(self) -> int:
        return self.samples_per_epoch // self.world_size - self.start


class SeededSamples(Dataset):
    """``dataset[index]`` for ``(index, key)`` items, with torch's and Python's random draws (the
    transforms') taken from generators seeded by ``key``; the caller's own random state is left as
    it was (in the main process, that is the training loop's)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, key = item
        python_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            random.seed(key)
            try:
                return self.dataset[index]
            except Exception as err:  # a file the preflight's sample did not include
                path = self.dataset.samples[index][0] if hasattr(self.dataset, "samples") else f"item {index}"
                detail = (str(err).strip().splitlines() or [""])[0][:120]
                raise DatasetError(f"image {path} cannot be read ({type(err).__name__}: {detail}): replace or "
                                   "remove it, then run again (the run resumes from its checkpoint)") from None
            finally:
                random.setstate(python_state)
