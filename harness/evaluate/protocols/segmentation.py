"""The semantic segmentation protocols, on a tree in ADE20K's layout (:mod:`harness.data.segmentation`):

- ``seg_upernet``: the paper's protocol: UperNet on the pretrained ViT, fine-tuned end to end
  (BEiT's and MAE's ADE20K recipe: 512 crops, 160k iterations at batch 16, AdamW with layer-wise
  lr decay, single-scale sliding-window mIoU);
- ``seg_linear``: a linear head on the frozen patch tokens, cheap enough for every cell of a grid.

Both read the same kind of settings for their tree (``root``, ``train_split``, ``val_split``,
``num_classes``); the probe's patch-token maps are one feature set, extracted once per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from harness.core.errors import UserError
from harness.core.frozen import FrozenModel
from harness.evaluate.protocols.spec import EvalContext, FeatureSet, Metric, Protocol, check_batch_splits

if TYPE_CHECKING:
    from torch import Tensor

ADE20K_CLASSES = 150


class SegmentationData(FrozenModel):
    root: str = "data/ADEChallengeData2016"  # images/<split>/ and annotations/<split>/
    train_split: str = "training"
    val_split: str = "validation"
    # classes 1..K in the label maps (0 ignored); None: the tree's meta.json, else ADE20K's 150
    num_classes: int | None = Field(None, ge=2, le=254)


class SegLinearSettings(SegmentationData):
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)


class SegUperNetSettings(SegmentationData):
    crop_size: int = Field(512, gt=0)
    iterations: int = Field(160_000, gt=0)
    warmup_iterations: int = Field(1500, ge=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(1e-4, gt=0)
    layer_decay: float = Field(0.65, gt=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    drop_path: float = Field(0.1, ge=0, lt=1)
    channels: int = Field(768, gt=0)  # the decode head's width (BEiT's and MAE's: 768)
    checkpoint_every: int = Field(1000, gt=0)  # iterations between checkpoints (and loss points)


def class_count(settings: SegmentationData) -> int:
    from harness.data.segmentation import read_num_classes

    return settings.num_classes or read_num_classes(settings.root) or ADE20K_CLASSES


def _micro_data(settings: SegmentationData) -> dict[str, Any]:
    """The tree as it is when it is visible here, else the demo data's segmentation split (made on
    first use)."""
    if (Path(settings.root) / "images" / settings.train_split).is_dir():
        return {}
    from harness.data.assets import DEMO_DATA
    from harness.data.demo import SEGMENTATION_DIR, make_demo_dataset

    if not (DEMO_DATA / SEGMENTATION_DIR / "meta.json").is_file():  # missing, or made before it had the split
        make_demo_dataset(DEMO_DATA)
    return {"root": str(DEMO_DATA / SEGMENTATION_DIR), "train_split": "training", "val_split": "validation",
            "num_classes": None}


def _check_tree(settings: SegmentationData, name: str, batch_size: int) -> None:
    """Folders, file pairs, label range and a readable sample of both splits; a full batch."""
    from harness.data.segmentation import check_segmentation_tree, segmentation_pairs

    classes = class_count(settings)
    for split in (settings.train_split, settings.val_split):
        check_segmentation_tree(settings.root, split, classes)
    images = len(segmentation_pairs(settings.root, settings.train_split))
    if images < batch_size:
        raise UserError(f"eval.{name}.batch_size={batch_size} is more than the {images} training images of "
                        f"{settings.root}: give a batch of at most {images}")


# --- the frozen probe ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchMaps:
    """Patch-token maps [N, D, h, w] (float16, CPU) and label maps [N, H, W] (uint8) of both splits."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int


def _extract_patch_maps(encoder: Any, ctx: EvalContext) -> PatchMaps:
    """Both splits' maps at the encoder's input size, in shards over the job's ranks, kept in the
    run's evaluation folder until the frozen protocols are done."""
    import torch
    from torch.utils.data import DataLoader

    from harness.data.segmentation import SegmentationSet, probe_transform, segmentation_pairs
    from harness.evaluate.features import extract_features, patch_features
    from harness.evaluate.shards import sharded_features

    settings, cfg = ctx.cfg.eval.seg_linear, ctx.cfg
    transform = probe_transform(encoder.patch_embed.img_size[0])
    extract = partial(extract_features, feature=patch_features, label_dtype=torch.uint8)
    maps = []
    for split, name in ((settings.train_split, "seg-train"), (settings.val_split, "seg-val")):
        images = SegmentationSet(segmentation_pairs(settings.root, split), transform, class_count(settings))
        if ctx.work_dir is None:  # bench.py evaluate: one process, nothing to share or keep
            loader = DataLoader(images, batch_size=cfg.eval.feature_batch_size, num_workers=cfg.runtime.num_workers)
            maps.append(extract(encoder, loader, ctx.device))
        else:
            maps.append(sharded_features(encoder, images, rank=ctx.rank, world=ctx.world_size, folder=ctx.features_dir,
                                         name=name, batch_size=cfg.eval.feature_batch_size,
                                         num_workers=cfg.runtime.num_workers, device=ctx.device, wait=ctx.barrier,
                                         extract=extract))
    (train_x, train_y), (val_x, val_y) = maps
    return PatchMaps(train_x, train_y, val_x, val_y, class_count(settings))


PATCH_MAPS = FeatureSet("patch maps", _extract_patch_maps)


def _run_seg_linear(maps: PatchMaps, ctx: EvalContext) -> dict[str, float]:
    from harness.evaluate.seg_probe import segmentation_probe

    s = ctx.cfg.eval.seg_linear
    return segmentation_probe(maps.train_x, maps.train_y, maps.val_x, maps.val_y, num_classes=maps.num_classes,
                              epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, weight_decay=s.weight_decay,
                              device=ctx.device, seed=ctx.cfg.seed,
                              checkpoint=ctx.work_dir / "seg_linear.pt" if ctx.work_dir is not None else None)


SEG_LINEAR = Protocol(
    name="seg_linear", settings=SegLinearSettings, features=PATCH_MAPS, run=_run_seg_linear, headline_rank=4,
    metrics=(Metric("seg_linear_miou", "seg. linear-probe mIoU (%)"),
             Metric("seg_linear_pixel_accuracy", "seg. linear-probe pixel accuracy (%)")),
    micro=lambda s, world: {"epochs": 2, "batch_size": 8 * world, **_micro_data(s)},
    check_settings=lambda s, world: check_batch_splits("seg_linear", s.batch_size, world),
    check_data=lambda cfg: _check_tree(cfg.eval.seg_linear, "seg_linear", cfg.eval.seg_linear.batch_size),
)


# --- UperNet, the paper's protocol ----------------------------------------------------------------

def _run_seg_upernet(encoder: Any, ctx: EvalContext) -> dict[str, float]:
    from harness.data.segmentation import SegmentationSet, eval_transform, segmentation_pairs, train_transform
    from harness.evaluate.upernet_train import finetune_upernet

    cfg, s = ctx.cfg, ctx.cfg.eval.seg_upernet
    classes = class_count(s)
    train = SegmentationSet(segmentation_pairs(s.root, s.train_split), train_transform(s.crop_size), classes)
    val = SegmentationSet(segmentation_pairs(s.root, s.val_split), eval_transform(s.crop_size), classes)

    def checkpointed(iteration: int, loss: float) -> None:
        ctx.stage("seg_upernet", iteration)
        ctx.log({"seg_upernet/loss": loss}, iteration)

    return finetune_upernet(encoder, train, val, num_classes=classes, crop_size=s.crop_size,
                            iterations=s.iterations, batch_size=s.batch_size, lr=s.lr,
                            warmup_iterations=s.warmup_iterations, layer_decay=s.layer_decay,
                            weight_decay=s.weight_decay, drop_path=s.drop_path, channels=s.channels,
                            num_workers=cfg.runtime.num_workers, device=ctx.device, seed=cfg.seed,
                            checkpoint=ctx.work_dir / "seg_upernet.pt" if ctx.work_dir is not None else None,
                            checkpoint_every=s.checkpoint_every, on_checkpoint=checkpointed)


def _check_upernet(cfg: Any) -> None:
    from harness.milan.presets import PRESETS

    s = cfg.eval.seg_upernet
    patch = PRESETS[cfg.model.size].patch_size if cfg.model.size in PRESETS else None
    if patch and s.crop_size % patch:
        raise UserError(f"eval.seg_upernet.crop_size={s.crop_size} is not a multiple of the {cfg.model.size} "
                        f"patch size {patch}: give a multiple of {patch} (the paper: 512)")
    _check_tree(s, "seg_upernet", s.batch_size)


SEG_UPERNET = Protocol(
    name="seg_upernet", settings=SegUperNetSettings, run=_run_seg_upernet, headline_rank=3,
    metrics=(Metric("seg_upernet_miou", "UperNet mIoU (%)"),
             Metric("seg_upernet_pixel_accuracy", "UperNet pixel accuracy (%)")),
    micro=lambda s, world: {"iterations": 4, "warmup_iterations": 1, "batch_size": 2 * world, "crop_size": 32,
                            "channels": 32, "checkpoint_every": 2, **_micro_data(s)},
    check_settings=lambda s, world: check_batch_splits("seg_upernet", s.batch_size, world),
    check_data=_check_upernet,
)

PROTOCOLS = (SEG_UPERNET, SEG_LINEAR)
