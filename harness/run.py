"""One run: pretrain a cell, then evaluate its encoder. Resumable at every stage.

The run folder's layout is :mod:`harness.run_folder`. Running the same config in the same folder
again continues where it stopped; a finished run returns its stored results.
"""

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from harness.cell_state import CellState
from harness.config import RunConfig
from harness.data.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    check_image_folder,
    eval_transform,
    image_folder,
    make_loader,
)
from harness.errors import ConfigError
from harness.evaluate import extract_features, finetune, finetune_transform, knn_classify, linear_probe_on_features
from harness.evaluate.shards import average_over_ranks, sharded_features
from harness.milan import build_student, needs_teacher
from harness.milan.checkpoint import build_timm_vit, load_encoder_into_timm
from harness.milan.presets import PRESETS
from harness.milan.teacher import check_teacher_weights, resolve_model_name
from harness.files import write_json_atomic
from harness.run_folder import (CONFIG_FILE, EVAL_DIR, METRICS_FILE, RESULTS_FILE, read_results, stopped_by_scheduler,
                                write_status)
from harness.train.checkpoint import load_latest
from harness.train.distributed import DistEnv, barrier, init_distributed, shutdown
from harness.train.metrics_log import JsonlLogger, RunLogger
from harness.train.pretrain import PretrainResult, TrainingFailed, pretrain_group, resolve_device


@dataclass(frozen=True)
class RunResult:
    state: CellState  # DONE or FAILED
    metrics: dict[str, float]
    run_dir: Path
    failure_reason: str | None = None


# --- preflight ---------------------------------------------------------------------------------

def preflight(cfg: RunConfig) -> None:
    """Everything that can be checked before any training: raises a one-line UserError."""
    m = cfg.model
    teacher_grid = None
    if needs_teacher(m.target, m.masking):
        import open_clip
        name = resolve_model_name(cfg.teacher.model)
        check_teacher_weights(name, cfg.teacher.pretrained)
        vision = open_clip.get_model_config(name)["vision_cfg"]
        teacher_grid = vision["image_size"] // vision["patch_size"]
    # the student's shape checks, on the meta device (no memory, no time)
    with torch.device("meta"):
        build_student(m.size, img_size=m.img_size, decoder=m.decoder, pred_dim=1,
                      mask_ratio=m.mask_ratio, decoder_embed_dim=m.decoder_width,
                      decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads)
    student_grid = m.img_size // PRESETS[m.size].patch_size
    if teacher_grid is not None and teacher_grid != student_grid:
        raise ConfigError(f"teacher {cfg.teacher.model} has a {teacher_grid}x{teacher_grid} patch grid but "
                          f"the student ({m.size} at {m.img_size}px) has {student_grid}x{student_grid}: "
                          "choose a teacher with the student's patch grid or change model.img_size")
    train_classes = check_image_folder(cfg.data.root, cfg.data.train_split)
    if cfg.eval.protocols:
        try:
            val_classes = check_image_folder(cfg.data.root, cfg.data.val_split)
        except DatasetError as err:
            raise DatasetError(f"evaluation ({', '.join(cfg.eval.protocols)}) needs a labelled "
                               f"validation split: {err}") from None
        if val_classes != train_classes:
            raise DatasetError(f"the {cfg.data.train_split}/ and {cfg.data.val_split}/ class folders differ "
                               f"under {cfg.data.root}: evaluation needs the same labels in both")


# --- evaluation --------------------------------------------------------------------------------

Stage = Callable[[str, int | None], None]


def evaluate_encoder(vit, cfg: RunConfig, device: torch.device, *, env: DistEnv = DistEnv(),
                     work_dir: Path | None = None, stage: Stage = lambda name, progress: None,
                     logger: RunLogger | None = None) -> dict[str, float]:
    """The selected protocols on a timm ViT encoder; accuracies in percent, on rank 0 (other ranks
    get {}). Every rank calls it and takes part: the features of the frozen protocols are extracted
    in shards over the ranks, k-NN and every validation pass split the validation images over
    them, and the linear probe and fine-tuning train with DDP over them. With
    ``work_dir`` (a run's evaluation folder) each stage keeps its progress there (feature shards,
    the linear probe's and the fine-tune's checkpoints after every epoch), so a requeued job
    continues where it stopped. On rank 0,
    ``stage(name, progress)`` as each stage (features, knn, linear, finetune) starts and as it goes,
    and ``logger`` gets the fine-tune's loss per epoch."""
    e, rt, root = cfg.eval, cfg.runtime, cfg.data.root
    size = vit.patch_embed.img_size[0]
    metrics: dict[str, float] = {}
    frozen = [p for p in e.protocols if p in ("linear", "knn")]
    if frozen:
        start = time.perf_counter()
        stage("features", None)
        splits = [image_folder(root, split, eval_transform(size)) for split in (cfg.data.train_split, cfg.data.val_split)]
        num_classes = len(splits[0].classes)
        if work_dir is None:  # bench.py evaluate: one process, nothing to share or keep
            features = [extract_features(vit, make_loader(split, batch_size=e.feature_batch_size, shuffle=False,
                                                          num_workers=rt.num_workers, drop_last=False, seed=cfg.seed),
                                         device) for split in splits]
        else:
            features = [sharded_features(vit, split, rank=env.rank, world=env.world_size, folder=work_dir / "features",
                                         name=name, batch_size=e.feature_batch_size, num_workers=rt.num_workers,
                                         device=device, wait=lambda: barrier(env))
                        for split, name in zip(splits, ("train", "val"))]
        (train_x, train_y), (val_x, val_y) = features
        metrics["eval/feature_seconds"] = time.perf_counter() - start
        if "knn" in frozen:  # each rank votes for its share of the validation images
            stage("knn", None)
            mine = slice(env.rank, None, env.world_size)
            votes = knn_classify(train_x, train_y, val_x[mine], val_y[mine], k=e.knn.k,
                                 temperature=e.knn.temperature, num_classes=num_classes)
            metrics |= average_over_ranks(votes, len(val_y[mine]), device)
        if "linear" in frozen:
            stage("linear", None)
            lp = e.linear
            metrics |= linear_probe_on_features(
                train_x, train_y, val_x, val_y, num_classes=num_classes, epochs=lp.epochs,
                batch_size=lp.batch_size, base_lr=lp.base_lr, warmup_epochs=lp.warmup_epochs,
                optimizer=lp.optimizer, device=device, seed=cfg.seed,
                checkpoint=work_dir / "linear.pt" if work_dir is not None else None)
        if work_dir is not None and env.is_main:  # several GB at ImageNet scale; the metrics are what is kept
            shutil.rmtree(work_dir / "features", ignore_errors=True)
        if not env.is_main:
            metrics = {}
    if "finetune" in e.protocols:
        stage("finetune", 0)
        ft = e.finetune
        # the student always sees ImageNet-normalised input (the teacher renormalises its own copy)
        augment = finetune_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, randaug=ft.randaug, reprob=ft.reprob)
        train_ds = image_folder(root, cfg.data.train_split, augment)
        val = image_folder(root, cfg.data.val_split, eval_transform(size))
        val_share = Subset(val, range(env.rank, len(val), env.world_size))  # each rank validates its share
        val_loader = make_loader(val_share, batch_size=e.feature_batch_size, shuffle=False,
                                 num_workers=rt.num_workers, drop_last=False, seed=cfg.seed)

        def epoch_done(epoch: int, loss: float) -> None:
            stage("finetune", epoch)
            if logger is not None:
                logger.log_metrics({"finetune/loss": loss}, step=epoch)
                logger.flush()

        metrics |= finetune(vit, train_ds, val_loader, num_classes=len(train_ds.classes), epochs=ft.epochs,
                            batch_size=ft.batch_size, base_lr=ft.base_lr, warmup_epochs=ft.warmup_epochs,
                            layer_decay=ft.layer_decay, drop_path=ft.drop_path, weight_decay=ft.weight_decay,
                            mixup=ft.mixup, cutmix=ft.cutmix, label_smoothing=ft.label_smoothing,
                            num_workers=rt.num_workers, device=device, seed=cfg.seed,
                            checkpoint=work_dir / "finetune.pt" if work_dir is not None else None,
                            on_epoch=epoch_done)
    return metrics


# --- the run -----------------------------------------------------------------------------------

# How a run's device-hours were counted (results.json "cost").
COST_ALONE = "its own job's time"
COST_SHARED = ("its share of a group job: its own student's compute, the teacher's time split among the "
               "students that need it, the rest (data loading, masks, logging) split equally; plus its evaluation")


def run_cost(seconds: float, device: torch.device, env: DistEnv) -> dict[str, float]:
    """What a run cost: GPU-hours on GPUs, CPU core-hours (ranks x torch threads) on CPUs. The
    pretraining time counts every attempt; the evaluation's, the attempt that finished it."""
    if device.type == "cuda":
        return {"gpu_hours": seconds * env.world_size / 3600}
    return {"cpu_core_hours": seconds * env.world_size * torch.get_num_threads() / 3600}


def run(cfg: RunConfig, run_dir: Path, logger: RunLogger | None = None,
        job_fields: dict[str, Any] | None = None) -> RunResult:
    """Pretrain then evaluate ``cfg`` in ``run_dir``; continues an interrupted run. ``job_fields``
    (the job id, its restarts) go into ``status.json`` with the attempt."""
    return run_group([cfg], [run_dir], [logger] if logger else None, job_fields)[0]


def run_group(cfgs: Sequence[RunConfig], run_dirs: Sequence[Path], loggers: Sequence[RunLogger] | None = None,
              job_fields: dict[str, Any] | None = None) -> list[RunResult]:
    """Pretrain the runs of a group together (one data stream, one teacher forward per batch:
    :func:`harness.train.pretrain.pretrain_group`), then evaluate each in turn. Every run keeps its
    own folder, checkpoint, status and results; one that fails (a non-finite loss, its own
    evaluation's error) fails alone. Finished runs return their stored results."""
    run_dirs = [Path(d) for d in run_dirs]
    device = resolve_device(cfgs[0].runtime.device)
    env = init_distributed(device, cfgs[0].runtime.dist_timeout_min)
    loggers = list(loggers) if loggers else [JsonlLogger(d / METRICS_FILE) for d in run_dirs]
    try:
        return _run_group(list(cfgs), run_dirs, loggers, device, env, job_fields or {})
    finally:
        shutdown(env)


def _run_group(cfgs: list[RunConfig], run_dirs: list[Path], loggers: list[RunLogger], device: torch.device,
               env: DistEnv, job_fields: dict[str, Any]) -> list[RunResult]:
    results: list[RunResult | None] = [None] * len(cfgs)
    for i, run_dir in enumerate(run_dirs):
        if (done := read_results(run_dir)) is not None:
            results[i] = RunResult(CellState.DONE, done["metrics"], run_dir)
    todo = [i for i, r in enumerate(results) if r is None]
    if not todo:
        return results
    # the job's group as submitted (launch.json), also when some of its cells ended in an earlier attempt
    group = {"group_size": len(cfgs)} | ({"group": [d.name for d in run_dirs]} if len(cfgs) > 1 else {})
    if env.is_main:
        for i in todo:
            run_dirs[i].mkdir(parents=True, exist_ok=True)
            (run_dirs[i] / CONFIG_FILE).write_text(cfgs[i].to_yaml())
            write_status(run_dirs[i], CellState.RUNNING, new_attempt=True, stage="pretrain", run_id=cfgs[i].run_id(),
                         cell_id=cfgs[i].cell_id(), **job_fields, **group)
    barrier(env)

    def failed(k: int, reason: str) -> None:
        if env.is_main:
            write_status(run_dirs[todo[k]], CellState.FAILED, reason=reason)

    pretrained = pretrain_group([cfgs[i] for i in todo], [run_dirs[i] for i in todo], [loggers[i] for i in todo],
                                device, env, on_failed=failed)
    if env.is_main and len(todo) > 1:  # the group's cells are evaluated one after another
        for i, result in zip(todo, pretrained):
            if not isinstance(result, TrainingFailed) and cfgs[i].eval.protocols:
                write_status(run_dirs[i], CellState.RUNNING, stage="pretrained", step=result.steps)
    for i, result in zip(todo, pretrained):
        if isinstance(result, TrainingFailed):
            results[i] = RunResult(CellState.FAILED, {}, run_dirs[i], failure_reason=str(result))
            continue
        try:
            results[i] = _evaluate(cfgs[i], run_dirs[i], loggers[i], result, device, env)
        except Exception as err:
            # every rank takes part in the evaluation: the job cannot go on; and a stop by the
            # scheduler is the job's (requeued), not this cell's failure
            if env.enabled or stopped_by_scheduler(err, None):
                raise
            reason = f"{type(err).__name__}: {err}"
            write_status(run_dirs[i], CellState.FAILED, reason=reason)
            results[i] = RunResult(CellState.FAILED, {}, run_dirs[i], failure_reason=reason)
    return results


def _evaluate(cfg: RunConfig, run_dir: Path, logger: RunLogger, result: PretrainResult, device: torch.device,
              env: DistEnv) -> RunResult:
    """Evaluate a pretrained run's encoder and write its results (rank 0)."""
    metrics: dict[str, float] = {
        "final_loss": result.final_loss, "images_per_s": result.images_per_s,
        "peak_memory_mb": result.peak_memory_mb, "train_seconds": result.train_seconds,
        "images_loaded": result.images_loaded, "teacher_images": result.teacher_images}
    eval_start = time.perf_counter()
    if cfg.eval.protocols:
        def stage(name: str, progress: int | None) -> None:
            if env.is_main:  # status shows "finetune 3": the stage, and its epochs done
                write_status(run_dir, CellState.RUNNING, stage=name, step=progress)

        stage("features", None)
        vit = build_timm_vit(cfg.model.size, cfg.model.img_size)
        load_encoder_into_timm(vit, load_latest(result.checkpoint.parent)["model"])
        metrics |= evaluate_encoder(vit, cfg, device, env=env, work_dir=run_dir / EVAL_DIR, stage=stage,
                                    logger=logger if env.is_main else None)
        if env.is_main:
            logger.log_metrics({k: v for k, v in metrics.items() if not k.startswith("train")}, step=result.steps)
            logger.flush()
    metrics |= run_cost(result.train_seconds + time.perf_counter() - eval_start, device, env)
    barrier(env)
    if env.is_main:
        write_json_atomic(run_dir / RESULTS_FILE, {"metrics": metrics, "run_id": cfg.run_id(), "cell_id": cfg.cell_id(),
                                                   "steps": result.steps, "checkpoint": str(result.checkpoint),
                                                   "cost": COST_SHARED if result.shared else COST_ALONE})
        write_status(run_dir, CellState.DONE, stage="done", step=result.steps, finished=time.time())
        shutil.rmtree(run_dir / EVAL_DIR, ignore_errors=True)  # the evaluation's progress: now in results.json
    return RunResult(CellState.DONE, metrics, run_dir)
