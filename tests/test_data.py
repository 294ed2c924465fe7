"""Tests for the data layer: demo generator, ImageFolder checks, transforms, loaders, captions."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DistributedSampler

from harness.data import demo
from harness.data.datasets import (
    CaptionedImages,
    DatasetError,
    check_image_folder,
    eval_transform,
    image_folder,
    make_loader,
    pretrain_transform,
)
from harness.data.demo import CLASSES, make_demo_dataset
from harness.core.errors import UserError

SMALL = {"train_per_class": 6, "val_per_class": 3}


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> demo.DemoDatasetInfo:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", **SMALL)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = _digest(make_demo_dataset(tmp_path / "a", seed=3, **SMALL).root)
    b = _digest(make_demo_dataset(tmp_path / "b", seed=3, **SMALL).root)
    c = _digest(make_demo_dataset(tmp_path / "c", seed=4, **SMALL).root)
    assert a == b
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in pngs)


def test_layout_counts_and_image_format(small_demo: demo.DemoDatasetInfo) -> None:
    root = small_demo.root
    assert small_demo.classes == CLASSES and len(CLASSES) == 10
    assert small_demo.counts == {"train": 60, "val": 30}
    for split, per_class in (("train", 6), ("val", 3)):
        assert sorted(p.name for p in (root / split).iterdir()) == list(CLASSES)
        for cls in CLASSES:
            assert len(list((root / split / cls).glob("*.png"))) == per_class
    img = Image.open(next((root / "val" / "star").glob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert (root / "README.txt").read_text().startswith("milan-bench synthetic demo dataset")


def test_captions_cover_every_image_and_describe_it(small_demo: demo.DemoDatasetInfo) -> None:
    root = small_demo.root
    with open(root / "captions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    images = {str(p.relative_to(root)) for split in demo.SPLITS for p in (root / split).rglob("*.png")}
    assert {r["path"] for r in rows} == images
    for r in rows:
        cls = Path(r["path"]).parent.name
        assert r["split"] == Path(r["path"]).parts[0]
        words = r["caption"].split()
        assert demo._NOUNS.get(cls, cls) in r["caption"]
        assert words[1] in demo.SIZES and words[2] in demo.COLOURS
        assert r["caption"].endswith("background") and words[-2] in demo.COLOURS and words[-3] in demo.TEXTURES


def test_second_call_reuses_and_other_arguments_regenerate(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_demo_dataset(root, **SMALL)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    make_demo_dataset(root, **SMALL)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    info = make_demo_dataset(root, train_per_class=2, val_per_class=1)
    assert info.counts == {"train": 20, "val": 10}
    assert len(list((root / "train").rglob("*.png"))) + len(list((root / "val").rglob("*.png"))) == 30
    # the segmentation split: a fifth per class of each (at least one), an image and a label map each
    assert len(list((root / "segmentation").rglob("*.png"))) == 2 * (10 + 10)
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"]  # no temporary folders left behind


def test_refuses_to_overwrite_a_folder_that_is_not_a_demo_dataset(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo dataset"):
        make_demo_dataset(tmp_path, **SMALL)
    assert (tmp_path / "mine.txt").exists()


def test_nuisance_factors_are_drawn_independently_of_the_class() -> None:
    """Same RNG state, different class: everything but the shape noun is the same."""
    captions = {
        cls: demo.render_image(cls, 32, np.random.default_rng(7))[1].replace(demo._NOUNS.get(cls, cls), "<shape>")
        for cls in CLASSES
    }
    assert len(set(captions.values())) == 1


def test_mean_colour_does_not_reveal_the_class(tmp_path: Path) -> None:
    """Nearest class centroid on per-image mean RGB stays near chance (10%)."""
    info = make_demo_dataset(tmp_path / "ds", train_per_class=40, val_per_class=30)

    def mean_rgb(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        ds = image_folder(info.root, split, transform=None)
        feats = torch.tensor(np.stack([np.asarray(img, np.float32).mean((0, 1)) for img, _ in ds]))
        return feats, torch.tensor(ds.targets)

    x_train, y_train = mean_rgb("train")
    x_val, y_val = mean_rgb("val")
    centroids = torch.stack([x_train[y_train == k].mean(0) for k in range(len(CLASSES))])
    accuracy = (torch.cdist(x_val, centroids).argmin(1) == y_val).float().mean().item()
    assert accuracy < 0.2


# --- check_image_folder -------------------------------------------------------------------------

def _mkdir(path: Path) -> None:
    path.mkdir(parents=True)


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def test_check_image_folder_accepts_a_valid_tree(small_demo: demo.DemoDatasetInfo) -> None:
    assert check_image_folder(small_demo.root, "val") == list(CLASSES)


@pytest.mark.parametrize(
    ("setup", "split", "key_words"),
    [
        (lambda r: None, "train", ["dataset root", "does not exist", "data.root"]),
        (lambda r: r.mkdir(), "train", ["train", "does not exist", "data.root"]),
        (lambda r: (r / "train").mkdir(parents=True), "train", ["no class folders", "<class>"]),
        (lambda r: (r / "train" / "cat").mkdir(parents=True), "train", ["no images", ".png"]),
        (lambda r: (_mkdir(r / "train" / "cat"), (r / "train" / "cat" / "a.txt").write_text("x")),
         "train", ["no images"]),
        (lambda r: (_png(r / "val" / "cat" / "a.PNG"), (r / "val" / ".ipynb_checkpoints").mkdir()),
         "val", ["without images", ".ipynb_checkpoints", "remove"]),
    ],
    ids=["root-missing", "split-missing", "no-class-folders", "no-images", "wrong-extension", "some-empty"],
)
def test_check_image_folder_errors(tmp_path: Path, setup, split: str, key_words: list[str]) -> None:
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DatasetError) as err:
        check_image_folder(root, split)
    message = str(err.value)
    assert "\n" not in message
    for word in key_words:
        assert word in message


def test_image_folder_raises_dataset_error_not_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        image_folder(tmp_path, "train", transform=None)


# --- transforms and loaders ----------------------------------------------------------------------

def test_transform_shapes_and_dtypes() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    for tf in (pretrain_transform(32), eval_transform(32)):
        out = tf(img)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(eval_transform(32)(img), eval_transform(32)(img))


def _first_batches(loader, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _same(a: list, b: list) -> bool:
    return all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_loader_is_reproducible_with_a_seed_in_workers(small_demo: demo.DemoDatasetInfo) -> None:
    ds = image_folder(small_demo.root, "train", pretrain_transform(32))
    kwargs = {"batch_size": 8, "shuffle": True, "num_workers": 2, "drop_last": True}
    torch.manual_seed(1)
    a = _first_batches(make_loader(ds, seed=5, **kwargs))
    torch.manual_seed(2)  # the global seed must not matter when workers do the augmentation
    b = _first_batches(make_loader(ds, seed=5, **kwargs))
    c = _first_batches(make_loader(ds, seed=6, **kwargs))
    assert _same(a, b)
    assert not _same(a, c)


def test_loader_order_is_seeded_in_the_main_process(small_demo: demo.DemoDatasetInfo) -> None:
    ds = image_folder(small_demo.root, "train", eval_transform(32))
    kwargs = {"batch_size": 60, "shuffle": True, "num_workers": 0, "drop_last": False}
    (_, a), = _first_batches(make_loader(ds, seed=5, **kwargs), 1)
    (_, b), = _first_batches(make_loader(ds, seed=5, **kwargs), 1)
    (_, c), = _first_batches(make_loader(ds, seed=6, **kwargs), 1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_distributed_loader_shuffles_in_the_sampler(small_demo: demo.DemoDatasetInfo, tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = image_folder(small_demo.root, "val", eval_transform(32))
        loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=0, drop_last=False, seed=0, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.shuffle
        loader.sampler.set_epoch(0)
        first = [int(i) for i in loader.sampler]
        loader.sampler.set_epoch(1)
        assert sorted(first) == list(range(len(ds))) and [int(i) for i in loader.sampler] != first
    finally:
        dist.destroy_process_group()


# --- captions ------------------------------------------------------------------------------------

def test_captioned_images(small_demo: demo.DemoDatasetInfo) -> None:
    ds = CaptionedImages(small_demo.root, "val")
    assert len(ds) == small_demo.counts["val"]
    image, caption = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(caption, str) and caption.endswith("background")
    image, _ = CaptionedImages(small_demo.root, "train", transform=eval_transform(24))[0]
    assert image.shape == (3, 24, 24)


def test_captioned_images_errors(small_demo: demo.DemoDatasetInfo, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        CaptionedImages(tmp_path, "train")
    with pytest.raises(DatasetError, match="no rows for split 'test'"):
        CaptionedImages(small_demo.root, "test")


def test_gpu_decode_draws_the_cpu_paths_crops_and_matches_its_pixels(tmp_path) -> None:
    """data.decode=gpu (decode_jpeg, here on the CPU): each image's crop and flip are the ones the CPU
    transform draws from the same key, and the pixels agree with it up to the decoders' rounding."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from harness.data.datasets import pretrain_transform
    from harness.data.gpu_decode import JpegCrops, collate_jpeg_crops, decode_crops
    from harness.data.sampler import SeededSamples

    rng = torch.Generator().manual_seed(0)
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    for i in range(6):
        base = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=rng), size=(75, 100), mode="bilinear")
        Image.fromarray((base[0].permute(1, 2, 0) * 255).byte().numpy()).save(folder / f"{i}.jpg", quality=95)
    tree = ImageFolder(str(tmp_path / "train"))
    cpu = SeededSamples(ImageFolder(str(tmp_path / "train"), transform=pretrain_transform(32)))
    gpu = SeededSamples(JpegCrops(tree.samples))
    keys = [(i, 1000 + i) for i in range(6)]
    batch = collate_jpeg_crops([gpu[k] for k in keys])
    decoded = decode_crops(batch, 32, torch.device("cpu"))
    reference = torch.stack([cpu[k][0] for k in keys])
    assert decoded.shape == reference.shape == (6, 3, 32, 32)
    assert (decoded - reference).abs().mean() < 0.05  # the same crops: a crop elsewhere differs by ~0.5
    other = torch.stack([cpu[(i, 2000 + i)][0] for i in range(6)])
    assert (other - reference).abs().mean() > 0.1
