"""Semantic segmentation trees in ADE20K's layout, and the transforms of the BEiT/MAE protocol.

A tree (``ADEChallengeData2016`` or any of its shape)::

    images/<split>/<name>.jpg        (any image format)
    annotations/<split>/<name>.png   8-bit label map: 0 "other" (ignored), 1..K the classes

Labels are read as mmseg's ``reduce_zero_label`` does: 0 becomes :data:`IGNORE` and k becomes
k - 1, so the classes are 0..K-1. ADE20K has K = 150; another tree gives its count, or writes it
as ``num_classes`` in a ``meta.json`` at its root (the demo data does).

Training (BEiT's and mmseg's ADE20K pipeline): a random rescale to ``ratio`` x (4 x crop, crop)
keeping the aspect ratio, with ``ratio`` in [0.5, 2]; a random crop of crop x crop in which no
class covers more than 75% of the labelled pixels (ten tries); a horizontal flip; photometric
jitter; padding to the crop (image 0, label ignored). Evaluation: the image rescaled as training
does at ratio 1 (shorter side at most the crop, longer side at most 4 x crop, ratio kept),
predicted in sliding windows, scored at the label map's own resolution.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from harness.data.datasets import IMAGENET_MEAN, IMAGENET_STD, DatasetError

IGNORE = 255
IMAGES, ANNOTATIONS = "images", "annotations"
SAMPLE = 16  # label maps the preflight reads per split
CAT_MAX_RATIO, CROP_TRIES = 0.75, 10
RESCALE_RATIOS = (0.5, 2.0)

Pair = tuple[Path, Path]


def segmentation_pairs(root: Path | str, split: str) -> list[Pair]:
    """(image, label map) files of a split, by name; an image without a label map, or the reverse,
    is a DatasetError naming it."""
    root = Path(root)
    images_dir, labels_dir = root / IMAGES / split, root / ANNOTATIONS / split
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetError(f"segmentation folder {folder} does not exist: give the root of a tree in ADE20K's "
                               f"layout ({IMAGES}/<split>/ and {ANNOTATIONS}/<split>/, e.g. ADEChallengeData2016)")
    images = {p.stem: p for p in images_dir.iterdir() if p.suffix.lower() in IMG_EXTENSIONS}
    labels = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() == ".png"}
    if not images:
        raise DatasetError(f"segmentation folder {images_dir} holds no images: put the split's images there")
    for name in sorted(images.keys() ^ labels.keys()):
        missing = labels_dir if name in images else images_dir
        raise DatasetError(f"{(images.get(name) or labels[name])} has no partner in {missing}: every image needs "
                           f"a label map of the same name ({name}.png) and every label map an image")
    return [(images[name], labels[name]) for name in sorted(images)]


def read_num_classes(root: Path | str) -> int | None:
    """The class count a tree writes in its ``meta.json`` (``num_classes``), or None."""
    try:
        count = json.loads((Path(root) / "meta.json").read_text()).get("num_classes")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count > 0 else None


def check_segmentation_tree(root: Path | str, split: str, num_classes: int) -> None:
    """The split's folders and pairs, and a sample of its pairs: readable, the image's size, and
    labels within 0..num_classes (0 ignored). Each problem is one DatasetError line."""
    pairs = segmentation_pairs(root, split)
    step = max(1, len(pairs) // SAMPLE)
    for image_path, label_path in pairs[::step][:SAMPLE]:
        try:
            with Image.open(image_path) as image, Image.open(label_path) as label:
                image.load()
                label.load()
                sizes, mode, values = (image.size, label.size), label.mode, np.unique(np.asarray(label))
        except Exception as err:  # noqa: BLE001 - Pillow raises many kinds for a broken file
            raise DatasetError(f"{image_path} or {label_path} cannot be decoded ({type(err).__name__}): replace or "
                               "remove the pair") from None
        if mode not in ("L", "P"):
            raise DatasetError(f"label map {label_path} is {mode}: label maps are 8-bit single-channel PNGs "
                               "(0 ignored, 1..K the classes)")
        if sizes[0] != sizes[1]:
            raise DatasetError(f"{image_path} is {sizes[0][0]}x{sizes[0][1]} but its label map is "
                               f"{sizes[1][0]}x{sizes[1][1]}: they must match")
        if (top := int(values.max())) > num_classes and top != IGNORE:
            raise DatasetError(f"label map {label_path} holds label {top} but the tree has {num_classes} classes: "
                               "give the right num_classes for the tree")


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 ("other") -> ignored; k -> k - 1."""
    label = label.astype(np.int64)
    return np.where(label == 0, IGNORE, np.where(label == IGNORE, IGNORE, label - 1))


class SegmentationSet(Dataset):
    """``(image [3, H, W] normalised, label [H, W] int64)`` per pair, through ``transform(image,
    label)`` (PIL image, label array after :func:`reduce_zero_label`). With ``num_classes``, a label
    map holding a class beyond it is a DatasetError naming the file (the preflight reads a sample)."""

    def __init__(self, pairs: list[Pair], transform: Callable[[Image.Image, np.ndarray], tuple[torch.Tensor,
                                                                                               torch.Tensor]],
                 num_classes: int | None = None) -> None:
        self.samples = [(str(image), str(label)) for image, label in pairs]
        self.transform = transform
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.samples[index]
        with Image.open(image_path) as image, Image.open(label_path) as label_map:
            label = reduce_zero_label(np.asarray(label_map))
            if self.num_classes is not None and (top := int(label[label != IGNORE].max(initial=0))) >= self.num_classes:
                raise DatasetError(f"label map {label_path} holds label {top + 1} but the tree has {self.num_classes} "
                                   "classes: give the right num_classes for the tree, or fix the file")
            return self.transform(image.convert("RGB"), label)


_normalise = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _resize(image: Image.Image, label: np.ndarray, size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    """Both to ``size`` (width, height): the image bilinear, the labels nearest."""
    resized = Image.fromarray(label.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
    return image.resize(size, Image.Resampling.BILINEAR), np.asarray(resized).astype(np.int64)


def short_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``short`` and the ratio kept."""
    scale = short / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def rescaled_size(width: int, height: int, crop: int, ratio: float = 1.0) -> tuple[int, int]:
    """mmseg's keep-ratio Resize to the scale ratio x (4 x crop, crop): as large as fits a longer
    side of 4 x crop x ratio and a shorter side of crop x ratio."""
    scale = min(4 * crop * ratio / max(width, height), crop * ratio / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def probe_transform(size: int) -> Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """The frozen probe's view: the shorter side to ``size``, then the central size x size square."""
    def apply(image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = _resize(image, label, short_side_size(*image.size, size))
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        return _normalise(image), torch.from_numpy(label[top:top + size, left:left + size].copy())
    return apply


def eval_transform(crop: int) -> Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation: the image rescaled (:func:`rescaled_size`); the labels as they are."""
    def apply(image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        resized = image.resize(rescaled_size(*image.size, crop), Image.Resampling.BILINEAR)
        return _normalise(resized), torch.from_numpy(label.copy())
    return apply


_photometric = transforms.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)


def train_transform(crop: int) -> Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]:
    """BEiT's/mmseg's ADE20K training pipeline (module docstring); its random draws come from torch's
    and Python's generators (seeded per sample by the caller)."""
    def apply(image: Image.Image, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = _resize(image, label, rescaled_size(*image.size, crop, random.uniform(*RESCALE_RATIOS)))
        top, left = _crop_corner(label, crop)
        image = image.crop((left, top, left + crop, top + crop))  # PIL pads past the border with black
        label = _pad(label[top:top + crop, left:left + crop], crop)
        if torch.rand(1) < 0.5:
            image, label = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), label[:, ::-1]
        return _normalise(_photometric(image)), torch.from_numpy(np.ascontiguousarray(label))
    return apply


def _crop_corner(label: np.ndarray, crop: int) -> tuple[int, int]:
    """A crop whose most frequent labelled class covers at most 75% of its labelled pixels (mmseg's
    cat_max_ratio), the last of ten tries otherwise."""
    height, width = label.shape
    for _ in range(CROP_TRIES):
        top = random.randint(0, max(0, height - crop))
        left = random.randint(0, max(0, width - crop))
        window = label[top:top + crop, left:left + crop]
        counts = np.bincount(window[window != IGNORE].ravel())
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
    return top, left


def _pad(label: np.ndarray, crop: int) -> np.ndarray:
    padded = np.full((crop, crop), IGNORE, dtype=np.int64)
    padded[:label.shape[0], :label.shape[1]] = label
    return padded

