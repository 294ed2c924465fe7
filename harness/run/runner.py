"""One run: pretrain a cell, then evaluate its encoder. Resumable at every stage.

The run folder's layout is :mod:`harness.run.folder`. Running the same config in the same folder
again continues where it stopped; a finished run returns its stored results.
"""

import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from harness.config import RunConfig
from harness.core.distributed import DistEnv, barrier, init_distributed, resolve_device, shutdown
from harness.core.files import write_json_atomic
from harness.milan.teacher import build_teacher, teacher_encoder
from harness.milan.weights import build_timm_vit, load_encoder_into_timm
from harness.run.cell_state import CellState
from harness.run.evaluation import evaluate_encoder
from harness.run.folder import (CONFIG_FILE, EVAL_DIR, METRICS_FILE, RESULTS_FILE, SchedulerStopWatch, check_owner,
                                failure_reason, finished_source, mark_unfinished, read_results, stopped_by_scheduler,
                                weights_source, write_status)
from harness.train.checkpoint import checkpoint_file, load_latest
from harness.train.metrics_log import JsonlLogger
from harness.train.pretrain import PretrainResult, TrainingFailed, pretrain_group


@dataclass(frozen=True)
class RunResult:
    state: CellState  # DONE or FAILED
    metrics: dict[str, float]
    run_dir: Path
    failure_reason: str | None = None


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


def run(cfg: RunConfig, run_dir: Path, logger: JsonlLogger | None = None,
        job_fields: dict[str, Any] | None = None) -> RunResult:
    """Pretrain then evaluate ``cfg`` in ``run_dir``; continues an interrupted run. ``job_fields``
    (the job id, its restarts) go into ``status.json`` with the attempt."""
    return run_group([cfg], [run_dir], [logger] if logger else None, job_fields)[0]


def run_group(cfgs: Sequence[RunConfig], run_dirs: Sequence[Path], loggers: Sequence[JsonlLogger] | None = None,
              job_fields: dict[str, Any] | None = None) -> list[RunResult]:
    """Pretrain the runs of a group together (one data stream, one teacher forward per batch:
    :func:`harness.train.pretrain.pretrain_group`), then evaluate each in turn. Every run keeps its
    own folder, checkpoint, status and results; one that fails (a non-finite loss, its own
    evaluation's error) fails alone. Finished runs return their stored results."""
    run_dirs = [Path(d) for d in run_dirs]
    for cfg, run_dir in zip(cfgs, run_dirs):
        check_owner(run_dir, cfg.run_id())
    device = resolve_device(cfgs[0].runtime.device)
    env = init_distributed(device, cfgs[0].runtime.dist_timeout_min)
    loggers = list(loggers) if loggers else [JsonlLogger(d / METRICS_FILE) for d in run_dirs]
    try:
        with SchedulerStopWatch() as watch:
            return _run_group(list(cfgs), run_dirs, loggers, device, env, job_fields or {})
    except KeyboardInterrupt:
        if env.is_main:
            mark_unfinished(run_dirs, CellState.REQUEUED, "interrupted (Ctrl-C): resumes from its last checkpoint")
        raise
    except Exception as err:
        if env.is_main and not stopped_by_scheduler(err, watch):  # a stop is the job's to record (requeued)
            mark_unfinished(run_dirs, CellState.FAILED, failure_reason(err))
        raise
    finally:
        shutdown(env)


def _run_group(cfgs: list[RunConfig], run_dirs: list[Path], loggers: list[JsonlLogger], device: torch.device,
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

    # runs that evaluate a finished run's encoder (pretrain.weights_from) train nothing
    pretrained: dict[int, PretrainResult | TrainingFailed] = {
        i: _borrowed(cfgs[i], run_dirs[i]) for i in todo if cfgs[i].pretrain.weights_from}
    # and so do the runs that evaluate the frozen teacher (eval.encoder: teacher)
    pretrained |= {i: NOTHING_TRAINED for i in todo if cfgs[i].eval.encoder == "teacher"}
    training = [i for i in todo if i not in pretrained]

    def failed(k: int, reason: str) -> None:
        if env.is_main:
            write_status(run_dirs[training[k]], CellState.FAILED, reason=reason)

    if training:
        pretrained |= zip(training, pretrain_group([cfgs[i] for i in training], [run_dirs[i] for i in training],
                                                   [loggers[i] for i in training], device, env, on_failed=failed))
    if env.is_main and len(todo) > 1:  # the group's cells are evaluated one after another
        for i in todo:
            if not isinstance(result := pretrained[i], TrainingFailed) and cfgs[i].eval.protocols:
                write_status(run_dirs[i], CellState.RUNNING, stage="pretrained", step=result.steps)
    for i in todo:
        result = pretrained[i]
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


# what a run that evaluates the teacher's image tower reports of its (absent) pretraining
NOTHING_TRAINED = PretrainResult(steps=0, total_steps=0, final_loss=float("nan"), images_per_s=float("nan"),
                                 peak_memory_mb=float("nan"), train_seconds=0.0, checkpoint=None, resumed_from=0,
                                 images_loaded=0.0, teacher_images=0.0, shared=False)


def _borrowed(cfg: RunConfig, run_dir: Path) -> PretrainResult:
    """The pretraining of the finished run whose encoder ``cfg`` evaluates (``pretrain.weights_from``,
    under the runs dir that holds ``run_dir``'s grid): its checkpoint and its training numbers, at
    no cost to this run."""
    assert cfg.pretrain.weights_from is not None
    runs_dir = run_dir.absolute().parent.parent
    results = finished_source(cfg.pretrain.weights_from, runs_dir)
    source = results.get("metrics", {})
    return PretrainResult(
        steps=results["steps"], total_steps=results["steps"], final_loss=source.get("final_loss", float("nan")),
        images_per_s=source.get("images_per_s", float("nan")), peak_memory_mb=source.get("peak_memory_mb", float("nan")),
        train_seconds=0.0, checkpoint=checkpoint_file(weights_source(cfg.pretrain.weights_from, runs_dir)),
        resumed_from=0, images_loaded=0.0, teacher_images=0.0, shared=False)


def _encoder(cfg: RunConfig, result: PretrainResult) -> VisionTransformer:
    """The timm ViT the run evaluates: its trained (or borrowed) student, or the teacher's tower."""
    if cfg.eval.encoder == "teacher":
        t = cfg.teacher
        return teacher_encoder(build_teacher(t.model, t.pretrained, t.normalize))
    assert result.checkpoint is not None
    vit = build_timm_vit(cfg.model.size, cfg.model.img_size)
    load_encoder_into_timm(vit, load_latest(result.checkpoint.parent)["model"])
    return vit


def _evaluate(cfg: RunConfig, run_dir: Path, logger: JsonlLogger, result: PretrainResult, device: torch.device,
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
        vit = _encoder(cfg, result)
        def log(curves: Mapping[str, float], step: int) -> None:
            if env.is_main:
                logger.log_metrics(curves, step=step)
                logger.flush()

        metrics |= evaluate_encoder(vit, cfg, device, env=env, work_dir=run_dir / EVAL_DIR, stage=stage, log=log)
        if env.is_main:
            logger.log_metrics({k: v for k, v in metrics.items() if not k.startswith("train")}, step=result.steps)
            logger.flush()
    metrics |= run_cost(result.train_seconds + time.perf_counter() - eval_start, device, env)
    barrier(env)
    if env.is_main:
        write_json_atomic(run_dir / RESULTS_FILE, {"metrics": metrics, "run_id": cfg.run_id(), "cell_id": cfg.cell_id(),
                                                   "steps": result.steps, "checkpoint": str(result.checkpoint or ""),
                                                   "cost": COST_SHARED if result.shared else COST_ALONE})
        write_status(run_dir, CellState.DONE, stage="done", step=result.steps, finished=time.time())
        shutil.rmtree(run_dir / EVAL_DIR, ignore_errors=True)  # the evaluation's progress: now in results.json
    return RunResult(CellState.DONE, metrics, run_dir)
