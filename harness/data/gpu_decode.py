"""The pretraining augmentation with its JPEG decoding on the GPU (``data.decode: gpu``).

A node's CPU cores may not decode JPEGs as fast as one GPU trains on them (``bench.py speed``
measures both). Here the loader's workers only read each file's bytes and draw its crop and flip,
with the same random draws, in the same order, as the CPU path's ``RandomResizedCrop`` and
``RandomHorizontalFlip`` (:func:`harness.data.datasets.pretrain_transform`); the main process
decodes the batch with ``torchvision.io.decode_jpeg`` on the training device, then crops, resizes
(bicubic, antialiased), flips and normalises there. The crops and flips are the CPU path's; the
pixels differ from it by the decoder's and the resampler's rounding. JPEG files only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop

from harness.data.datasets import IMAGENET_MEAN, IMAGENET_STD, PRETRAIN_CROP_SCALE

PRETRAIN_CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default, as the CPU path uses it


class JpegCrops(Dataset):
    """``(file bytes, label, [top, left, height, width, flip])`` per image of an ImageFolder
    dataset's samples; the crop and flip drawn from torch's RNG as the CPU transforms draw them. The
    bytes travel from the workers as plain ``bytes``: a tensor per file would be shared through a file
    descriptor each, and a batch of hundreds ran out of them (``bench.py speed``)."""

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[bytes, int, torch.Tensor]:
        path, label = self.samples[index]
        with Image.open(path) as header:  # the size, from the header alone
            top, left, height, width = RandomResizedCrop.get_params(header, list(PRETRAIN_CROP_SCALE),
                                                                    list(PRETRAIN_CROP_RATIO))
        flip = bool(torch.rand(1) < 0.5)
        return Path(path).read_bytes(), label, torch.tensor([top, left, height, width, int(flip)])


def collate_jpeg_crops(batch: Sequence[tuple[bytes, int, torch.Tensor]]) -> tuple[list[bytes], torch.Tensor,
                                                                              torch.Tensor]:
    """The files' bytes stay a list (they differ in length); labels and crops are stacked."""
    data, labels, crops = zip(*batch)
    return list(data), torch.tensor(labels), torch.stack(crops)


def decode_crops(batch: tuple[list[bytes], Any, torch.Tensor], img_size: int,
                 device: torch.device) -> torch.Tensor:
    """A collated batch -> normalised images [N, 3, img_size, img_size] on ``device``."""
    data, _, crops = batch
    encoded = [torch.frombuffer(bytearray(file), dtype=torch.uint8) for file in data]
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    out = torch.empty(len(images), 3, img_size, img_size, device=device)
    for k, (image, (top, left, height, width, flip)) in enumerate(zip(images, crops.tolist())):
        crop = image[:, top:top + height, left:left + width].unsqueeze(0).float()
        crop = F.interpolate(crop, size=(img_size, img_size), mode="bicubic", antialias=True, align_corners=False)
        out[k] = crop[0].flip(-1) if flip else crop[0]
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (out.clamp_(0, 255) / 255 - mean) / std
