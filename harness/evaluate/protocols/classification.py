"""The classification protocols of MAE and MILAN, on an ImageFolder tree's train/ and val/ splits:

- ``knn``: DINO's weighted k-NN on frozen cls-token features;
- ``linear``: MAE's linear probe (BatchNorm + linear head, LARS) on the same frozen features;
- ``finetune``: MAE's end-to-end fine-tuning (layer decay, Mixup/CutMix, RandAugment).

The two frozen protocols share one extraction of the cls features (:data:`CLS_FEATURES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from harness.core.errors import UserError
from harness.core.frozen import FrozenModel
from harness.evaluate.protocols.spec import EvalContext, FeatureSet, Metric, Protocol, check_batch_splits

if TYPE_CHECKING:
    from torch import Tensor


class KnnSettings(FrozenModel):
    k: int = Field(20, gt=0)
    temperature: float = Field(0.07, gt=0)


class LinearProbeSettings(FrozenModel):
    epochs: int = Field(100, gt=0)
    warmup_epochs: int = Field(10, ge=0)
    batch_size: int = Field(16384, gt=0)
    base_lr: float = Field(0.05, gt=0)  # lr = base_lr * batch / 256
    optimizer: Literal["lars", "sgd"] = "lars"


class FinetuneSettings(FrozenModel):
    epochs: int = Field(100, gt=0)
    warmup_epochs: int = Field(5, ge=0)
    batch_size: int = Field(1024, gt=0)
    base_lr: float = Field(1e-4, gt=0)
    layer_decay: float = Field(0.65, gt=0, le=1)
    drop_path: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.05, ge=0)
    mixup: float = Field(0.8, ge=0)
    cutmix: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    randaug: str = "rand-m9-mstd0.5-inc1"
    reprob: float = Field(0.25, ge=0, le=1)


# --- the shared frozen features ------------------------------------------------------------------

@dataclass(frozen=True)
class LabelledFeatures:
    """Cls-token features after the final norm (float32, CPU) with their labels, of both splits."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    num_classes: int


def _extract_cls(encoder: Any, ctx: EvalContext) -> LabelledFeatures:
    """Every split's cls features: in shards over the job's ranks, kept in the run's evaluation
    folder until the frozen protocols are done (a requeued job does not extract them again)."""
    from harness.data.datasets import eval_transform, image_folder, make_loader
    from harness.evaluate.features import extract_features
    from harness.evaluate.shards import sharded_features

    cfg = ctx.cfg
    size = encoder.patch_embed.img_size[0]
    splits = [image_folder(cfg.data.root, split, eval_transform(size)) for split in (cfg.data.train_split,
                                                                                      cfg.data.val_split)]
    batch, workers = cfg.eval.feature_batch_size, cfg.runtime.num_workers
    if ctx.work_dir is None:  # bench.py evaluate: one process, nothing to share or keep
        features = [extract_features(encoder, make_loader(split, batch_size=batch, shuffle=False, num_workers=workers,
                                                          drop_last=False, seed=cfg.seed), ctx.device)
                    for split in splits]
    else:
        features = [sharded_features(encoder, split, rank=ctx.rank, world=ctx.world_size,
                                     folder=ctx.features_dir, name=name, batch_size=batch,
                                     num_workers=workers, device=ctx.device, wait=ctx.barrier)
                    for split, name in zip(splits, ("train", "val"))]
    (train_x, train_y), (val_x, val_y) = features
    return LabelledFeatures(train_x, train_y, val_x, val_y, len(splits[0].classes))


CLS_FEATURES = FeatureSet("cls", _extract_cls)


def _check_classification_data(cfg: Any) -> None:
    """The tree's train/ and val/ splits hold the same classes."""
    from harness.data.datasets import DatasetError, check_image_folder, check_image_sample

    d = cfg.data
    train_classes = check_image_folder(d.root, d.train_split)
    try:
        val_classes = check_image_folder(d.root, d.val_split)
    except DatasetError as err:
        raise DatasetError(f"evaluation ({', '.join(cfg.eval.protocols)}) needs a labelled "
                           f"validation split: {err}") from None
    if val_classes != train_classes:
        raise DatasetError(f"the {d.train_split}/ and {d.val_split}/ class folders differ "
                           f"under {d.root}: evaluation needs the same labels in both")
    if len(train_classes) < 2:
        raise DatasetError(f"{d.root}/{d.train_split} has one class ({train_classes[0]}): classification "
                           "needs two or more; add classes or evaluate with other protocols")
    check_image_sample(d.root, d.val_split)


# --- k-NN ------------------------------------------------------------------------------------------

def _run_knn(features: LabelledFeatures, ctx: EvalContext) -> dict[str, float]:
    """Each rank votes for its share of the validation images; the accuracies are combined."""
    from harness.evaluate.knn import knn_classify
    from harness.evaluate.shards import average_over_ranks

    knn = ctx.cfg.eval.knn
    mine = slice(ctx.rank, None, ctx.world_size)
    votes = knn_classify(features.train_x, features.train_y, features.val_x[mine], features.val_y[mine], k=knn.k,
                         temperature=knn.temperature, num_classes=features.num_classes)
    return average_over_ranks(votes, len(features.val_y[mine]), ctx.device)


def _check_knn_data(cfg: Any) -> None:
    from harness.data.datasets import count_images

    _check_classification_data(cfg)
    images = count_images(Path(cfg.data.root) / cfg.data.train_split) or 0
    if cfg.eval.knn.k > images:
        raise UserError(f"eval.knn.k={cfg.eval.knn.k} is more than the {images} training images of {cfg.data.root}: "
                        f"give k <= {images} (DINO's recipe: 20)")


KNN = Protocol(
    name="knn", settings=KnnSettings, features=CLS_FEATURES, run=_run_knn, headline_rank=2, on_by_default=True,
    metrics=(Metric("knn_top1", "k-NN top-1 (%)"), Metric("knn_top5", "k-NN top-5 (%)")),
    micro=lambda s, world: {"k": min(s.k, 10)},
    check_data=_check_knn_data,
)


# --- linear probe ----------------------------------------------------------------------------------

def _run_linear(features: LabelledFeatures, ctx: EvalContext) -> dict[str, float]:
    from harness.evaluate.linear_probe import linear_probe_on_features

    lp = ctx.cfg.eval.linear
    return linear_probe_on_features(
        features.train_x, features.train_y, features.val_x, features.val_y, num_classes=features.num_classes,
        epochs=lp.epochs, batch_size=lp.batch_size, base_lr=lp.base_lr, warmup_epochs=lp.warmup_epochs,
        optimizer=lp.optimizer, device=ctx.device, seed=ctx.cfg.seed,
        checkpoint=ctx.work_dir / "linear.pt" if ctx.work_dir is not None else None)


LINEAR = Protocol(
    name="linear", settings=LinearProbeSettings, features=CLS_FEATURES, run=_run_linear, headline_rank=0,
    on_by_default=True,
    metrics=(Metric("linear_top1", "linear-probe top-1 (%)"), Metric("linear_top5", "linear-probe top-5 (%)")),
    micro=lambda s, world: {"epochs": 2, "warmup_epochs": 0, "batch_size": 16 * world},
    check_settings=lambda s, world: check_batch_splits("linear", s.batch_size, world),
    check_data=_check_classification_data,
)


# --- fine-tuning -----------------------------------------------------------------------------------

def _run_finetune(encoder: Any, ctx: EvalContext) -> dict[str, float]:
    """DDP over the job's ranks; each rank validates its share of the validation images."""
    from torch.utils.data import Subset

    from harness.data.datasets import IMAGENET_MEAN, IMAGENET_STD, eval_transform, image_folder, make_loader
    from harness.evaluate.finetune import finetune, finetune_transform

    cfg, ft = ctx.cfg, ctx.cfg.eval.finetune
    size = encoder.patch_embed.img_size[0]
    # the student always sees ImageNet-normalised input (the teacher renormalises its own copy)
    augment = finetune_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, randaug=ft.randaug, reprob=ft.reprob)
    train = image_folder(cfg.data.root, cfg.data.train_split, augment)
    val = image_folder(cfg.data.root, cfg.data.val_split, eval_transform(size))
    val_share = Subset(val, range(ctx.rank, len(val), ctx.world_size))
    val_loader = make_loader(val_share, batch_size=cfg.eval.feature_batch_size, shuffle=False,
                             num_workers=cfg.runtime.num_workers, drop_last=False, seed=cfg.seed)

    def epoch_done(epoch: int, loss: float) -> None:
        ctx.stage("finetune", epoch)
        ctx.log({"finetune/loss": loss}, epoch)

    return finetune(encoder, train, val_loader, num_classes=len(train.classes), epochs=ft.epochs,
                    batch_size=ft.batch_size, base_lr=ft.base_lr, warmup_epochs=ft.warmup_epochs,
                    layer_decay=ft.layer_decay, drop_path=ft.drop_path, weight_decay=ft.weight_decay,
                    mixup=ft.mixup, cutmix=ft.cutmix, label_smoothing=ft.label_smoothing,
                    num_workers=cfg.runtime.num_workers, device=ctx.device, seed=cfg.seed,
                    checkpoint=ctx.work_dir / "finetune.pt" if ctx.work_dir is not None else None,
                    on_epoch=epoch_done)


FINETUNE = Protocol(
    name="finetune", settings=FinetuneSettings, run=_run_finetune, headline_rank=1,
    metrics=(Metric("finetune_top1", "fine-tune top-1 (%)"), Metric("finetune_top5", "fine-tune top-5 (%)")),
    micro=lambda s, world: {"epochs": 2, "warmup_epochs": 0, "batch_size": 8 * world},
    check_settings=lambda s, world: check_batch_splits("finetune", s.batch_size, world),
    check_data=_check_classification_data,
)

PROTOCOLS = (LINEAR, KNN, FINETUNE)
