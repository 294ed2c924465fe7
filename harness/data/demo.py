"""Synthetic, captioned ImageNet-layout dataset for running the benchmark without downloads.

Each image shows one shape on a textured background. The class is the shape kind only; colour,
size, position, rotation, background colour, background texture and pixel noise are drawn
independently of the class, so no per-image colour statistic gives the class away and a
model has to learn shape to classify well. That keeps a randomly initialised ViT well below a
trained one, which is the gap pretraining is supposed to close. Every image has a caption
naming shape, colour, size, position and background, so a tiny CLIP teacher can be trained on
the same data.

Every image is drawn from its own RNG keyed by (seed, split, class, index), so the output is a
pure function of the arguments: the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harness.core.errors import UserError

GENERATOR_VERSION = 3  # 3: the segmentation split
SPLITS = ("train", "val")
# The segmentation split, in ADE20K's layout (segmentation/images/<split>/*.png with a label map of
# the same name in segmentation/annotations/<split>/): the same kind of images; the shape's pixels
# are labelled with its class (1..10), the background 0 ("other", ignored as in ADE20K).
SEGMENTATION_DIR = "segmentation"
SEGMENTATION_SPLITS = {"training": "train", "validation": "val"}  # ADE20K's split -> the image stream's
SUPERSAMPLE = 4  # shapes are drawn 4x larger and box-downsampled: cheap antialiasing

# Named colours: the name goes into the caption, so they must be far enough apart to be told apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (235, 215, 45),
    "green": (50, 165, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 75, 215),
    "purple": (135, 60, 185),
    "pink": (240, 135, 185),
    "brown": (125, 75, 35),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
}
MIN_COLOUR_DISTANCE = 110.0  # shape/background pairs closer than this (RGB L2) are never drawn
SIZES: dict[str, tuple[float, float]] = {  # bounding radius as a fraction of the image side
    "small": (0.22, 0.28),
    "medium": (0.28, 0.36),
    "large": (0.36, 0.44),
}
_COLOUR_PAIRS = [(a, b) for a in COLOURS for b in COLOURS
                 if a != b and math.dist(COLOURS[a], COLOURS[b]) >= MIN_COLOUR_DISTANCE]
# Smooth backgrounds only. Version 1 also drew stripes, dots and checks: at 4x4-pixel patches those
# look like shape edges, and a small ViT trained from scratch on a CPU budget (a few thousand
# steps) learned nothing from that data, pretrained or supervised, so no ablation could show.
TEXTURES = ("plain", "gradient", "mottled")
POSITIONS = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)

Point = tuple[float, float]


def _star(points: int = 5, inner: float = 0.45) -> list[Point]:
    """Outline alternating between tips (radius 1) and notches (radius ``inner``)."""
    vertices = []
    for k in range(2 * points):
        angle, r = math.pi * k / points - math.pi / 2, 1.0 if k % 2 == 0 else inner
        vertices.append((r * math.cos(angle), r * math.sin(angle)))
    return vertices


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[Point]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _checker_cells(half: float = 0.75, n: int = 3) -> list[list[Point]]:
    step = 2 * half / n
    return [_rect(-half + i * step, -half + j * step, -half + (i + 1) * step, -half + (j + 1) * step)
            for i in range(n) for j in range(n) if (i + j) % 2 == 0]


# Unit-radius outlines (shapes fit the unit circle); circles are handled by _ELLIPSES below.
# Classes whose shapes are rotations of each other (square/diamond, cross/X) are deliberately
# absent because every shape is drawn at a random rotation.
_POLYGONS: dict[str, list[list[Point]]] = {
    "square": [_rect(-0.7, -0.7, 0.7, 0.7)],
    "triangle": [[(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]],
    "cross": [_rect(-0.28, -1.0, 0.28, 1.0), _rect(-1.0, -0.28, 1.0, 0.28)],
    "star": [_star()],
    "bars": [_rect(-0.85, y - 0.19, 0.85, y + 0.19) for y in (-0.62, 0.0, 0.62)],
    "checkerboard": _checker_cells(),
    "arrow": [[(-1.0, -0.22), (0.15, -0.22), (0.15, -0.6), (1.0, 0.0), (0.15, 0.6), (0.15, 0.22), (-1.0, 0.22)]],
}
# (offset, radius, fill) discs drawn in order; the offset is along the rotation direction.
_ELLIPSES: dict[str, list[tuple[float, float, int]]] = {
    "circle": [(0.0, 0.85, 255)],
    "ring": [(0.0, 0.9, 255), (0.0, 0.55, 0)],
    "crescent": [(0.0, 0.9, 255), (0.45, 0.75, 0)],
}
CLASSES: tuple[str, ...] = (
    "arrow", "bars", "checkerboard", "circle", "crescent", "cross", "ring", "square", "star", "triangle",
)
_NOUNS = {"bars": "set of bars", "checkerboard": "checkerboard patch"}


@dataclass(frozen=True)
class DemoDatasetInfo:
    """What was generated, so callers need not re-scan the tree."""

    root: Path
    classes: tuple[str, ...]
    counts: Mapping[str, int] = field(hash=False)  # images per split
    image_size: int


@dataclass(frozen=True)
class _Spec:
    """The generation parameters; equal specs produce identical datasets."""

    image_size: int
    train_per_class: int
    val_per_class: int
    seed: int

    def per_class(self, split: str) -> int:
        return self.train_per_class if split == "train" else self.val_per_class

    @property
    def segmentation_per_class(self) -> tuple[int, int]:
        """(training, validation) images per class of the segmentation split: a fifth of the
        classification split's (60 and 30 at the defaults)."""
        return max(1, self.train_per_class // 5), max(1, self.val_per_class // 5)

    def counts(self) -> dict[str, int]:
        return {s: self.per_class(s) * len(CLASSES) for s in SPLITS}

    def meta(self) -> dict:
        return {
            "generator": "harness.data.demo",
            "version": GENERATOR_VERSION,
            "seed": self.seed,
            "image_size": self.image_size,
            "train_per_class": self.train_per_class,
            "val_per_class": self.val_per_class,
            "supersample": SUPERSAMPLE,
            "classes": list(CLASSES),
            "counts": self.counts(),
            "segmentation": {"per_class": list(self.segmentation_per_class), "num_classes": len(CLASSES)},
        }

    def info(self, root: Path) -> DemoDatasetInfo:
        return DemoDatasetInfo(root=root, classes=CLASSES, counts=self.counts(), image_size=self.image_size)


def make_demo_dataset(
    root: Path,
    *,
    image_size: int = 32,
    train_per_class: int = 300,
    val_per_class: int = 150,
    seed: int = 0,
) -> DemoDatasetInfo:
    """Generate the demo dataset at ``root`` (or reuse it if already generated with these arguments).

    The tree is written to a temporary sibling and renamed into place, so ``root`` is either
    absent or complete: an interrupted run never leaves a half-written dataset that a later call
    would mistake for a finished one. ``root`` may be missing, empty, or a previous demo dataset
    (which is replaced); anything else is a UserError rather than deleting user files.
    """
    root = Path(root)
    if image_size < 8 or train_per_class < 1 or val_per_class < 1 or seed < 0:
        raise UserError(f"demo dataset: need image size >= 8 (got {image_size}), at least one image per "
                        f"class in each split (got {train_per_class} train, {val_per_class} val) and "
                        f"seed >= 0 (got {seed}): change those options")
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a folder: give a new or empty folder for the demo dataset")
    spec = _Spec(image_size, train_per_class, val_per_class, seed)
    existing = _read_meta(root)
    if existing == spec.meta():
        return spec.info(root)
    if root.exists() and any(root.iterdir()) and existing is None:
        raise UserError(f"{root} is not empty and is not a demo dataset: pick a new or empty directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        _write_dataset(tmp, spec)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec.info(root)


def _read_meta(root: Path) -> dict | None:
    try:
        return json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _write_dataset(out: Path, spec: _Spec) -> None:
    jobs = [(out, spec, split, cls) for split in SPLITS for cls in CLASSES]
    segmentation = [(out, spec, split, cls) for split in SEGMENTATION_SPLITS for cls in CLASSES]
    # spawn, not fork: the caller may be a training process with threads or CUDA state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1), mp_context=context) as pool:
        rows = [row for chunk in pool.map(_write_class, *zip(*jobs)) for row in chunk]
        list(pool.map(_write_segmentation_class, *zip(*segmentation)))
    (out / SEGMENTATION_DIR / "meta.json").write_text(json.dumps({"num_classes": len(CLASSES),
                                                                  "classes": list(CLASSES)}, indent=2) + "\n")
    with open(out / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["split", "path", "caption"])
        writer.writerows(rows)
    (out / "README.txt").write_text(_readme(spec))
    (out / "meta.json").write_text(json.dumps(spec.meta(), indent=2) + "\n")  # written last: marks completion


def _write_class(out: Path, spec: _Spec, split: str, cls: str) -> list[tuple[str, str, str]]:
    """Render one (split, class) folder; returns its caption rows. Runs in a worker process."""
    folder = out / split / cls
    folder.mkdir(parents=True)
    rows = []
    for index in range(spec.per_class(split)):
        rng = np.random.default_rng([spec.seed, SPLITS.index(split), CLASSES.index(cls), index])
        pixels, caption, _ = render_image(cls, spec.image_size, rng)
        rel = f"{split}/{cls}/{cls}_{index:05d}.png"
        Image.fromarray(pixels).save(out / rel)
        rows.append((split, rel, caption))
    return rows


def _write_segmentation_class(out: Path, spec: _Spec, split: str, cls: str) -> None:
    """One class's images and label maps of a segmentation split. Runs in a worker process."""
    images, labels = out / SEGMENTATION_DIR / "images" / split, out / SEGMENTATION_DIR / "annotations" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    count = spec.segmentation_per_class[list(SEGMENTATION_SPLITS).index(split)]
    for index in range(count):
        rng = np.random.default_rng([spec.seed, 2 + list(SEGMENTATION_SPLITS).index(split), CLASSES.index(cls), index])
        pixels, _, cover = render_image(cls, spec.image_size, rng)
        name = f"{cls}_{index:05d}"
        Image.fromarray(pixels).save(images / f"{name}.png")
        label = np.where(cover >= 0.5, CLASSES.index(cls) + 1, 0).astype(np.uint8)
        Image.fromarray(label).save(labels / f"{name}.png")


def render_image(cls: str, image_size: int, rng: np.random.Generator) -> tuple[np.ndarray, str, np.ndarray]:
    """Draw one image of class ``cls``; returns (HxWx3 uint8 pixels, caption, HxW shape cover in [0, 1]).

    All nuisance factors are drawn from ``rng`` independently of ``cls``.
    """
    fg_name, bg_name = _colour_pair(rng)
    fg = _jitter(COLOURS[fg_name], rng)
    bg = _jitter(COLOURS[bg_name], rng)
    size_name = str(rng.choice(list(SIZES)))
    radius = rng.uniform(*SIZES[size_name]) * image_size
    margin = 0.9 * radius  # lets at most a sliver of the shape leave the frame
    cx, cy = rng.uniform(margin, image_size - margin, size=2)
    angle = rng.uniform(0.0, 2 * math.pi)
    texture = str(rng.choice(TEXTURES))

    big = image_size * SUPERSAMPLE
    mask = _shape_mask(cls, big, (cx * SUPERSAMPLE, cy * SUPERSAMPLE), radius * SUPERSAMPLE, angle)
    pattern = _PATTERNS[texture](big, rng)
    shade = _shade(bg, rng)
    # Composite at output resolution: the canvas is affine in (mask, pattern * (1 - mask)), so
    # box-filtering those two single-channel maps gives the same pixels as filtering the
    # supersampled RGB canvas, at a third of the cost.
    cover = _box_reduce(mask)[..., None]
    texture_cover = _box_reduce(pattern * (1.0 - mask))[..., None]
    small = bg * (1.0 - cover) + (shade - bg) * texture_cover + fg * cover
    small += rng.normal(0.0, rng.uniform(0.0, 10.0), size=small.shape)
    pixels = np.clip(np.rint(small), 0, 255).astype(np.uint8)

    position = POSITIONS[min(int(3 * cy / image_size), 2)][min(int(3 * cx / image_size), 2)]
    noun = _NOUNS.get(cls, cls)
    caption = f"a {size_name} {fg_name} {noun} {position} on a {texture} {bg_name} background"
    return pixels, caption, cover[..., 0]


def _colour_pair(rng: np.random.Generator) -> tuple[str, str]:
    """(shape, background) colour names, always far enough apart to keep the shape visible."""
    return _COLOUR_PAIRS[int(rng.integers(len(_COLOUR_PAIRS)))]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float = 15.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


def _shape_mask(cls: str, size: int, centre: Point, radius: float, angle: float) -> np.ndarray:
    """Float mask in [0, 1] of the shape on a ``size`` x ``size`` canvas."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    cos, sin = math.cos(angle), math.sin(angle)
    cx, cy = centre
    for polygon in _POLYGONS.get(cls, []):
        draw.polygon([(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in polygon],
                     fill=255)
    for offset, r, fill in _ELLIPSES.get(cls, []):
        ex, ey = cx + radius * offset * cos, cy + radius * offset * sin
        draw.ellipse([ex - radius * r, ey - radius * r, ex + radius * r, ey + radius * r], fill=fill)
    return np.asarray(img, np.float32) / 255.0


def _shade(colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Second background colour for the texture: a weaker contrast than shape vs. background,
    so the texture is a distractor, not a competing foreground."""
    toward = 0.0 if colour.mean() > 110 else 255.0  # darken light colours, lighten dark ones
    return colour + rng.uniform(0.2, 0.4) * (toward - colour)


def _box_reduce(canvas: np.ndarray) -> np.ndarray:
    """Average SUPERSAMPLE x SUPERSAMPLE blocks: the antialiasing filter."""
    n = canvas.shape[0] // SUPERSAMPLE
    return canvas.reshape(n, SUPERSAMPLE, n, SUPERSAMPLE).mean(axis=(1, 3))


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in output-image pixels (the canvas is supersampled)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / SUPERSAMPLE
    return np.meshgrid(axis, axis, indexing="xy")


def _plain(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.zeros((size, size), np.float32)


def _gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    x, y = _coords(size)
    theta = rng.uniform(0, 2 * math.pi)
    ramp = x * math.cos(theta) + y * math.sin(theta)
    return (ramp - ramp.min()) / (ramp.max() - ramp.min())


def _mottled(size: int, rng: np.random.Generator) -> np.ndarray:
    blotches = Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8))
    return np.asarray(blotches.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0


_PATTERNS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "plain": _plain,
    "gradient": _gradient,
    "mottled": _mottled,
}


def _readme(spec: _Spec) -> str:
    counts = spec.counts()
    return (
        f"milan-bench synthetic demo dataset (generator version {GENERATOR_VERSION}, seed {spec.seed})\n"
        "Made by harness.data.demo.make_demo_dataset; the same arguments regenerate identical files.\n\n"
        f"Layout: ImageNet-style train/<class>/*.png and val/<class>/*.png, {spec.image_size}x{spec.image_size} RGB.\n"
        f"Images: {counts['train']} train ({spec.train_per_class}/class), "
        f"{counts['val']} val ({spec.val_per_class}/class).\n"
        f"Classes ({len(CLASSES)}), the shape kind only: {', '.join(CLASSES)}.\n"
        "Shape colour, size, position, rotation, background colour and texture, and pixel noise are drawn\n"
        "independently of the class.\n"
        "captions.csv: split,path,caption (path relative to this folder); each caption names shape,\n"
        "colour, size, position and background.\n"
        f"segmentation/: ADE20K's layout, images/<split>/*.png and annotations/<split>/*.png for training\n"
        f"({spec.segmentation_per_class[0]}/class) and validation ({spec.segmentation_per_class[1]}/class): the shape's "
        "pixels are labelled 1..10 (its class), the background 0 (ignored).\n"
    )
