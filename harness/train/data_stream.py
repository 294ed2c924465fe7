"""The pretraining data stream of a run or a group job: the images of each (seed, epoch, position)
(:mod:`harness.data.sampler`), augmented in the loader's CPU workers (``data.decode: cpu``, MAE's
transform) or decoded, cropped and resized on the training device (``gpu``,
:mod:`harness.data.gpu_decode`), a micro-batch at a time on the device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from harness.data.datasets import DatasetError, image_folder, make_loader, pretrain_transform
from harness.data.gpu_decode import JpegCrops, collate_jpeg_crops, decode_crops
from harness.data.sampler import ResumableSampler, SeededSamples


class PretrainStream:
    """``start(epoch, position)`` then ``next()`` for each micro-batch (this rank's share)."""

    def __init__(self, root: str, split: str, *, img_size: int, decode: str, batch_size: int, images_per_step: int,
                 num_workers: int, seed: int, device: torch.device, rank: int = 0, world_size: int = 1) -> None:
        gpu = decode == "gpu"
        dataset = image_folder(root, split, None if gpu else pretrain_transform(img_size))
        self.images = len(dataset)
        self.steps_per_epoch = len(dataset) // images_per_step
        self.img_size, self.device, self.gpu = img_size, device, gpu
        self.sampler = ResumableSampler(len(dataset), self.steps_per_epoch * images_per_step, seed=seed, rank=rank,
                                        world_size=world_size)
        items = SeededSamples(JpegCrops(dataset.samples) if gpu else dataset)
        self.loader = make_loader(items, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                  drop_last=True, seed=seed, sampler=self.sampler,
                                  collate_fn=collate_jpeg_crops if gpu else None)
        self._batches: Iterator | None = None

    def start(self, epoch: int, position: int = 0) -> None:
        """Serve ``epoch`` from this rank's ``position``-th image on."""
        self.sampler.set_epoch(epoch, start=position)
        self._batches = iter(self.loader)

    def next(self) -> torch.Tensor:
        try:
            batch = next(self._batches)
        except DatasetError as err:  # raised again in this process with the worker's traceback as its text
            raise DatasetError(str(err).strip().splitlines()[-1].split("DatasetError: ", 1)[-1]) from None
        if self.gpu:
            return decode_crops(batch, self.img_size, self.device)
        return batch[0].to(self.device, non_blocking=True)
