"""One run: pretrain a cell, then evaluate its encoder. Resumable at every stage.

A run folder holds:
  config.yaml       the resolved configuration
  status.json       state (running | done | failed), failure reason, step, host, timestamps
  metrics.jsonl     per-step training metrics
  checkpoints/      latest.pt, written atomically
  results.json      pretraining summary + evaluation metrics, written once both are done
Running the same config in the same folder again continues where it stopped; a finished run
returns its stored results.
"""

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig
from harness.data.datasets import DatasetError, check_image_folder, eval_transform, image_folder, make_loader
from harness.errors import ConfigError
from harness.evaluate import extract_features, finetune, finetune_transform, knn_classify, linear_probe_on_features
from harness.milan import build_student, needs_teacher
from harness.milan.checkpoint import build_timm_vit, load_encoder_into_timm
from harness.milan.presets import PRESETS
from harness.milan.teacher import check_pretrained, resolve_model_name
from harness.train.distributed import DistEnv, barrier, init_distributed, shutdown
from harness.train.metrics_log import JsonlLogger, RunLogger
from harness.train.pretrain import TrainingFailed, pretrain, resolve_device


@dataclass(frozen=True)
class RunResult:
    state: str  # "done" | "failed"
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
        check_pretrained(name, cfg.teacher.pretrained)
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

def evaluate_encoder(vit, cfg: RunConfig, device: torch.device) -> dict[str, float]:
    """The selected protocols on a timm ViT encoder; accuracies in percent."""
    e, rt, root = cfg.eval, cfg.runtime, cfg.data.root
    size = vit.patch_embed.img_size[0]
    metrics: dict[str, float] = {}
    frozen = [p for p in e.protocols if p in ("linear", "knn")]
    if frozen:
        start = time.perf_counter()
        loaders = [make_loader(image_folder(root, split, eval_transform(size)), batch_size=e.feature_batch_size,
                               shuffle=False, num_workers=rt.num_workers, drop_last=False, seed=cfg.seed)
                   for split in (cfg.data.train_split, cfg.data.val_split)]
        num_classes = len(loaders[0].dataset.classes)
        (train_x, train_y), (val_x, val_y) = (extract_features(vit, loader, device) for loader in loaders)
        metrics["eval/feature_seconds"] = time.perf_counter() - start
        if "knn" in frozen:
            metrics |= knn_classify(train_x, train_y, val_x, val_y, k=e.knn.k,
                                    temperature=e.knn.temperature, num_classes=num_classes)
        if "linear" in frozen:
            lp = e.linear
            metrics |= linear_probe_on_features(
                train_x, train_y, val_x, val_y, num_classes=num_classes, epochs=lp.epochs,
                batch_size=lp.batch_size, base_lr=lp.base_lr, warmup_epochs=lp.warmup_epochs,
                optimizer=lp.optimizer, device=device, seed=cfg.seed)
    if "finetune" in e.protocols:
        ft = e.finetune
        train_ds = image_folder(root, cfg.data.train_split, finetune_transform(size, randaug=ft.randaug, reprob=ft.reprob))
        val_loader = make_loader(image_folder(root, cfg.data.val_split, eval_transform(size)),
                                 batch_size=e.feature_batch_size, shuffle=False,
                                 num_workers=rt.num_workers, drop_last=False, seed=cfg.seed)
        metrics |= finetune(vit, train_ds, val_loader, num_classes=len(train_ds.classes), epochs=ft.epochs,
                            batch_size=ft.batch_size, base_lr=ft.base_lr, warmup_epochs=ft.warmup_epochs,
                            layer_decay=ft.layer_decay, drop_path=ft.drop_path, weight_decay=ft.weight_decay,
                            mixup=ft.mixup, cutmix=ft.cutmix, label_smoothing=ft.label_smoothing,
                            num_workers=rt.num_workers, device=device, seed=cfg.seed)
    return metrics


# --- the run -----------------------------------------------------------------------------------

def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def set_status(run_dir: Path, state: str, *, new_attempt: bool = False, **fields: Any) -> None:
    """Update status.json; ``new_attempt`` marks a (re)start of the run, counted in ``attempts``."""
    status = read_json(run_dir / "status.json") or {}
    status.update(state=state, updated=time.time(), host=socket.gethostname(), **fields)
    if new_attempt:
        status.setdefault("started", time.time())
        status["attempts"] = status.get("attempts", 0) + 1
        status.pop("reason", None)
    write_json_atomic(run_dir / "status.json", status)


def run(cfg: RunConfig, run_dir: Path, logger: RunLogger | None = None) -> RunResult:
    """Pretrain then evaluate ``cfg`` in ``run_dir``; continues an interrupted run."""
    run_dir = Path(run_dir)
    device = resolve_device(cfg.runtime.device)
    env = init_distributed(device)
    try:
        return _run(cfg, run_dir, logger, device, env)
    finally:
        shutdown(env)


def _run(cfg: RunConfig, run_dir: Path, logger: RunLogger | None, device: torch.device,
         env: DistEnv) -> RunResult:
    results_path = run_dir / "results.json"
    if (done := read_json(results_path)) is not None:
        return RunResult("done", done["metrics"], run_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        set_status(run_dir, "running", new_attempt=True, stage="pretrain", run_id=cfg.run_id(),
                   cell_id=cfg.cell_id())
    barrier(env)
    logger = logger or JsonlLogger(run_dir / "metrics.jsonl")
    try:
        result = pretrain(cfg, run_dir, logger, device, env)
        metrics: dict[str, float] = {
            "final_loss": result.final_loss, "images_per_s": result.images_per_s,
            "peak_memory_mb": result.peak_memory_mb, "train_seconds": result.train_seconds,
            "device_hours": result.train_seconds * env.world_size / 3600}
        if env.is_main and cfg.eval.protocols:
            set_status(run_dir, "running", stage="evaluate")
            vit = build_timm_vit(cfg.model.size, cfg.model.img_size)
            load_encoder_into_timm(vit, torch.load(result.checkpoint, map_location="cpu", weights_only=False)["model"])
            metrics |= evaluate_encoder(vit, cfg, device)
            logger.log_metrics({k: v for k, v in metrics.items() if not k.startswith("train")}, step=result.steps)
            logger.flush()
        barrier(env)
    except TrainingFailed as err:
        if env.is_main:
            set_status(run_dir, "failed", reason=str(err))
        return RunResult("failed", {}, run_dir, failure_reason=str(err))
    if env.is_main:
        write_json_atomic(results_path, {"metrics": metrics, "run_id": cfg.run_id(), "cell_id": cfg.cell_id(),
                                         "steps": result.steps, "checkpoint": str(result.checkpoint)})
        set_status(run_dir, "done", step=result.steps, finished=time.time())
    return RunResult("done", metrics, run_dir)
