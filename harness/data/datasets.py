"""ImageFolder datasets, MAE-style transforms and reproducible loaders.

Validation happens before torchvision sees the tree so that a misconfigured ``data.root``
fails with one actionable line instead of a FileNotFoundError traceback from deep inside
``ImageFolder``.
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms import InterpolationMode

from harness.core.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAIN_CROP_SCALE = (0.2, 1.0)  # MAE's RandomResizedCrop scale

_LAYOUT_HINT = "point data.root at an ImageFolder tree with train/ and val/ (make one with `bench.py data demo DIR`)"

Transform = Callable[[Image.Image], torch.Tensor]


class DatasetError(UserError, ValueError):
    """A dataset on disk is unusable; the message is one line: the problem, then the fix."""


def check_image_folder(root: Path | str, split: str) -> list[str]:
    """Validate ``root/split`` as an ImageFolder tree and return its sorted class names.

    Class folders are found exactly as ``torchvision.datasets.ImageFolder`` finds them (every
    subdirectory, hidden ones included), so the names returned here are the names it will use
    and every one of them must hold an image, or ImageFolder would refuse the tree.
    """
    root = Path(root)
    folder = root / split
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(f"dataset root {root} {what}: {_LAYOUT_HINT}")
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise DatasetError(f"dataset folder {folder} {what}: {_LAYOUT_HINT}")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise DatasetError(
            f"dataset folder {folder} has no class folders: put images in {folder}/<class>/ (ImageFolder layout)"
        )
    empty = [name for name in classes if not _has_image(folder / name)]
    if len(empty) == len(classes):
        raise DatasetError(
            f"dataset folder {folder} has class folders but no images ({', '.join(IMG_EXTENSIONS)}): "
            f"put image files in {folder}/<class>/"
        )
    if empty:
        raise DatasetError(
            f"class folders without images in {folder}: {', '.join(empty)}: add images or remove these folders"
        )
    return classes


@functools.cache
def count_images(folder: Path) -> int | None:
    """Files in an ImageFolder split (class sub-folders), or None when it is not there."""
    if not folder.is_dir():
        return None
    return sum(sum(1 for f in os.scandir(d.path) if f.is_file())
               for d in os.scandir(folder) if d.is_dir())


def _has_image(folder: Path) -> bool:
    """Whether ImageFolder would find at least one sample under ``folder`` (it walks recursively)."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(IMG_EXTENSIONS) for name in files):
            return True
    return False


# Pillow modes the loader turns into the right RGB image; 16-bit and float ones ("I;16", "I", "F")
# it turns into pure white, so a run would train on blanks.
EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
SAMPLE_PER_SPLIT = 32


def check_image_sample(root: Path | str, split: str, *, count: int = SAMPLE_PER_SPLIT, jpeg_only: bool = False) -> None:
    """Open ``count`` images of ``root/split``, spread over its classes (a fixed choice): each must
    decode, be 8-bit, and with ``jpeg_only`` be a JPEG; else a DatasetError naming the file."""
    folder = Path(root) / split
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
    step = max(1, len(files) // count)
    for path in files[::step][:count]:
        try:
            with Image.open(path) as image:
                image.load()
                mode, kind = image.mode, image.format
        except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for a broken file
            raise DatasetError(f"image {path} cannot be decoded ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:100] if str(err) else 'no detail'}): replace or remove it") from None
        if mode not in EIGHT_BIT_MODES:
            raise DatasetError(f"image {path} is {mode} (16-bit or float): the loader reads such images as white; "
                               "convert the tree to 8-bit images")
        if jpeg_only and kind != "JPEG":
            raise DatasetError(f"image {path} is {kind}, not JPEG: data.decode=gpu decodes JPEG files only; "
                               "use data.decode=cpu or convert the tree to JPEG")


def image_folder(root: Path | str, split: str, transform: Transform | None) -> datasets.ImageFolder:
    """``ImageFolder`` over ``root/split``, validated first so errors are ``DatasetError``s."""
    check_image_folder(root, split)
    return datasets.ImageFolder(str(Path(root) / split), transform=transform)


def pretrain_transform(
    img_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> transforms.Compose:
    """MAE/MILAN pretraining augmentation: random-resized crop and flip only.

    Masked modelling needs little augmentation (the mask is the regulariser), so this is the
    MAE recipe unchanged, including its bicubic resampling.
    """
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=PRETRAIN_CROP_SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def eval_transform(
    img_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    crop_pct: float = 0.875,
) -> transforms.Compose:
    """Deterministic evaluation view: resize to ``img_size / crop_pct`` then centre-crop, as in MAE's
    linear probe and fine-tuning evaluation."""
    return transforms.Compose([
        transforms.Resize(int(img_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    drop_last: bool,
    seed: int,
    distributed: bool = False,
    sampler: Sampler | None = None,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A ``DataLoader`` whose order and augmentations are a function of ``seed``.

    Reproducibility: the seeded generator fixes the shuffle order and the per-worker base seed;
    PyTorch then seeds ``torch``, ``random`` and ``numpy`` inside each worker from that base seed
    itself, so no ``worker_init_fn`` is needed. With ``num_workers == 0`` the transforms run in
    the main process and draw from the global torch RNG, so seed that too (``torch.manual_seed``).

    Distributed: the shuffle moves into a ``DistributedSampler`` (seeded with ``seed``, which
    needs an initialised process group); the caller must call ``loader.sampler.set_epoch(epoch)``
    before every epoch, or every epoch repeats the same order.

    A caller-supplied ``sampler`` (e.g. the pretraining loop's resumable one) replaces both.
    """
    if sampler is None and distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    workers = {"persistent_workers": True, "prefetch_factor": 2} if num_workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate_fn,
        **workers,
    )


class CaptionedImages(Dataset):
    """(image, caption) pairs of one split, read from ``root/captions.csv`` (``split,path,caption``).

    Used to train a small CLIP teacher on the demo dataset, where no pretrained CLIP can be
    downloaded. Paths in the CSV are relative to ``root``.
    """

    def __init__(self, root: Path | str, split: str, transform: Transform | None = None) -> None:
        self.root = Path(root)
        self.transform = transform or transforms.ToTensor()
        self.samples = _read_captions(self.root, split)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.samples[index]
        return self.transform(default_loader(str(self.root / path))), caption


def _read_captions(root: Path, split: str) -> list[tuple[str, str]]:
    csv_path = root / "captions.csv"
    if not csv_path.is_file():
        raise DatasetError(
            f"caption file {csv_path} does not exist: use a captioned dataset (make one with `bench.py data demo DIR`)"
        )
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"split", "path", "caption"} <= set(reader.fieldnames or ()):
            raise DatasetError(f"caption file {csv_path} lacks the columns split,path,caption: regenerate it")
        samples = [(row["path"], row["caption"]) for row in reader if row["split"] == split]
    if not samples:
        raise DatasetError(f"caption file {csv_path} has no rows for split {split!r}: use a split it lists")
    return samples
