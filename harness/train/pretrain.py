"""The pretraining loop: MAE/MILAN recipe, resumable to the step, optionally distributed, for one
student or a group of students that share the data and the teacher (:mod:`harness.config.student_side`).

Per optimiser step: ``accum_steps`` micro-batches, each loaded once, through the teacher once
(when some student needs it), with its masks drawn once per kind; then every student in turn:
forward/backward under bf16 autocast on CUDA, and AdamW at its own scheduled lr. A run alone is
a group of one. Every ``log_every`` steps the per-step losses are gathered in one device sync
(so the GPU is not stalled every step), checked for non-finite values (a student that goes
non-finite stops alone; the others go on) and logged. Checkpoints are atomic, one per student,
and hold everything needed to continue exactly: weights, optimiser, step, RNG state.

Every random draw of a step is a function of the seed and the step, never of the other students
nor of the attempt: the data order of (seed, epoch), each image's augmentation of (seed, epoch,
position) (:mod:`harness.data.sampler`), the masks of (seed, step, micro-batch, rank), the
student's initialisation of the seed alone. So a student computes the same in a group as alone, a resumed
run starts mid-epoch at the batch it would have drawn next, and cells of one seed are paired:
the same batches and, where their mask sampling and ratio agree, the same masks.
"""

import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from harness.config import RunConfig
from harness.config.student_side import check_shareable
from harness.core.distributed import DistEnv, barrier
from harness.core.tensor_files import save_atomic
from harness.core.errors import ConfigError
from harness.milan.model import build_student
from harness.milan.pretrainer import MilanPretrainer, build_pretrainer
from harness.milan.switches import needs_teacher
from harness.milan.teacher import ClipTeacher, build_teacher
from harness.milan.weights import encoder_state_dict
from harness.train.checkpoint import CorruptCheckpoint, checkpoint_file, load_latest, rng_state, set_rng_state
from harness.train.metrics_log import JsonlLogger
from harness.train.data_stream import PretrainStream
from harness.train.schedule import lr_at, scaled_lr
from harness.train.step import SectionTimer, allow_tf32, build_optimizer, train_step

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message is the recorded reason."""


OnFailed = Callable[[int, str], None]


@dataclass(frozen=True)
class PretrainResult:
    steps: int
    total_steps: int
    final_loss: float
    images_per_s: float
    peak_memory_mb: float
    # wall time of the training loop over all attempts; in a group, this student's share of it
    # (its own compute, its share of the teacher's and of the rest: see Pretraining.apportion)
    train_seconds: float
    checkpoint: Path | None  # None: nothing was trained (a teacher reference evaluates the teacher)
    resumed_from: int  # 0 for a fresh start
    images_loaded: float  # images decoded and augmented for this student; in a group, its share
    teacher_images: float  # images through the teacher for it; in a group, its share
    shared: bool  # some of its steps ran in a group, so its time and images are shares (apportion)


def build_model(cfg: RunConfig, teacher: ClipTeacher | None = None, rank: int = 0) -> MilanPretrainer:
    """The cell's student (with ``teacher`` when it needs one), initialised from the seed alone:
    every cell of a seed starts from the same encoder, whatever its target, decoder or teacher, alone
    or in a group (the cells of a seed are paired from their first weight)."""
    m = cfg.model
    if teacher is None and needs_teacher(m.target, m.masking):
        teacher = build_teacher(cfg.teacher.model, cfg.teacher.pretrained, cfg.teacher.normalize)
    with torch.random.fork_rng(devices=[]):  # the students' draws leave the global stream alone
        torch.manual_seed(cfg.seed * 1000 + rank)
        model = build_pretrainer(size=m.size, img_size=m.img_size, target=m.target, decoder=m.decoder,
                                 masking=m.masking, mask_ratio=m.mask_ratio,
                                 teacher=teacher if needs_teacher(m.target, m.masking) else None,
                                 norm_pix_loss=m.norm_pix_loss, decoder_embed_dim=m.decoder_width,
                                 decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads)
        # MAE's initialisation draws the decoder's and the head's weights in among the encoder's,
        # so the encoder comes from a student of one fixed decoder built from the same seed
        torch.manual_seed(cfg.seed * 1000 + rank)
        canonical = build_student(m.size, img_size=m.img_size, decoder="standard", pred_dim=1, mask_ratio=m.mask_ratio)
    model.student.load_state_dict(encoder_state_dict(canonical.state_dict()), strict=False)
    return model


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class _Student:
    """One student of a pretraining job and its bookkeeping."""

    index: int  # its position in the job's list of runs
    cfg: RunConfig
    run_dir: Path
    logger: JsonlLogger  # written on rank 0 only
    model: MilanPretrainer
    optimizer: torch.optim.AdamW
    peak_lr: float
    warmup_steps: int
    start_step: int
    clock: dict[str, float]
    watch: SectionTimer
    train_model: torch.nn.Module | None = None
    window: list[tuple[int, float, torch.Tensor]] = field(default_factory=list)  # (step, lr, loss on device)
    failed: str | None = None

    @property
    def clip_grad(self) -> float | None:
        return self.cfg.pretrain.clip_grad

    @property
    def precision(self) -> str:
        return self.cfg.pretrain.precision

    @property
    def ckpt_path(self) -> Path:
        return checkpoint_file(self.run_dir)

    @property
    def needs_teacher(self) -> bool:
        return needs_teacher(self.cfg.model.target, self.cfg.model.masking)

    def save(self, step: int, total_steps: int) -> None:
        """The checkpoint, then the log lines it covers (harness.train.metrics_log: the log only holds
        steps a checkpoint covers, so a resumed attempt never writes a step twice)."""
        save_atomic({"model": self.model.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "step": step, "total_steps": total_steps, "rng": rng_state(), "clock": self.clock,
                     "config": self.cfg.to_dict(), "log": self.logger.pending()}, self.ckpt_path)
        self.logger.flush()


def _new_clock() -> dict[str, float]:
    return {"loop_seconds": 0.0, "timed_images": 0, "timed_seconds": 0.0, "last_loss": math.nan,
            "images_loaded": 0.0, "teacher_images": 0.0, "shared": 0.0}


def pretrain_group(cfgs: Sequence[RunConfig], run_dirs: Sequence[Path], loggers: Sequence[JsonlLogger],
                   device: torch.device, env: DistEnv = DistEnv(),
                   on_failed: OnFailed = lambda index, reason: None) -> list[PretrainResult | TrainingFailed]:
    """Pretrain (or continue) every run of a group on one data stream and one teacher; rank 0 logs
    and saves. A student whose loss goes non-finite stops (``on_failed(index, reason)`` at once)
    and gets a :class:`TrainingFailed` in the result list; the others go on."""
    check_shareable(cfgs)
    shared = cfgs[0]  # the fields every run of the group agrees on (harness.config.student_side)
    p, rt = shared.pretrain, shared.runtime
    # the global stream: nothing in the loop draws from it (augmentations and masks have streams of their
    # own), but a resumed run continues it where the earliest student left it all the same
    torch.manual_seed(shared.seed * 1000 + env.rank)
    allow_tf32(device)

    images_per_step = p.batch_size * env.world_size * p.accum_steps
    stream = PretrainStream(shared.data.root, shared.data.train_split, img_size=shared.model.img_size,
                            decode=shared.data.decode, batch_size=p.batch_size, images_per_step=images_per_step,
                            num_workers=rt.num_workers, seed=shared.seed, device=device, rank=env.rank,
                            world_size=env.world_size)
    steps_per_epoch = stream.steps_per_epoch
    if steps_per_epoch == 0 and p.epochs:  # the untrained reference takes no step
        raise ConfigError(f"the training split has {stream.images} images, fewer than one step "
                          f"({images_per_step}): lower pretrain.batch_size or pretrain.accum_steps")
    # 0 epochs: the untrained encoder is saved as it is (a grid's random-init reference)
    total_steps = max(1, math.ceil(p.epochs * steps_per_epoch)) if p.epochs else 0

    teacher = None
    if any(needs_teacher(c.model.target, c.model.masking) for c in cfgs):
        with torch.random.fork_rng(devices=[]):
            teacher = build_teacher(shared.teacher.model, shared.teacher.pretrained, shared.teacher.normalize)
        teacher = teacher.to(device)
        if rt.compile:  # the teacher's forward too: 24% more images/s of the full MILAN step (bench.py speed, H200)
            teacher.compile()
    students = [_student(i, cfg, run_dir, logger, teacher, images_per_step, steps_per_epoch, total_steps,
                         device, env)
                for i, (cfg, run_dir, logger) in enumerate(zip(cfgs, run_dirs, loggers))]
    for s in students:
        if s.failed is not None:  # its checkpoint does not load: it fails, the others go on
            on_failed(s.index, s.failed)
    start_step = min((s.start_step for s in students if s.failed is None), default=total_steps)
    resumed = [s for s in students if s.failed is None and s.start_step == start_step > 0]
    if resumed:
        set_rng_state(load_latest(resumed[0].ckpt_path.parent)["rng"])

    progress = ProgressBar(total_steps, start_step, enabled=env.is_main)
    teacher_watch = SectionTimer(device)
    streaming = False
    window_start, first_window = time.perf_counter(), True
    window_loaded = window_teacher = 0  # images loaded / through the teacher in this window, all ranks
    for step in range(start_step, total_steps):
        active = [s for s in students if s.failed is None and s.start_step <= step]
        if not any(s.failed is None for s in students):
            break
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if not streaming or step_in_epoch == 0:
            stream.start(epoch, step_in_epoch * p.batch_size * p.accum_steps)
            streaming = True
        lrs = [lr_at(step, base=s.peak_lr, total_steps=total_steps, warmup_steps=s.warmup_steps,
                     min_lr=s.cfg.pretrain.min_lr) for s in active]
        micro_batches = (stream.next() for _ in range(p.accum_steps))
        counts = train_step(active, micro_batches, teacher=teacher, teacher_precision=p.precision, lrs=lrs,
                            seed=shared.seed, step=step, rank=env.rank, accum_steps=p.accum_steps,
                            distributed=env.enabled, teacher_timer=teacher_watch)
        window_loaded += counts.images * env.world_size
        window_teacher += counts.teacher_images * env.world_size
        for s, lr, step_loss in zip(active, lrs, counts.losses):
            s.window.append((step, lr, step_loss))

        done = step + 1
        if done % rt.log_every == 0 or done == total_steps or done % rt.checkpoint_every == 0:
            now = time.perf_counter()
            apportion(active, now - window_start, teacher_watch.take(), window_loaded, window_teacher,
                      images_per_step=images_per_step, timed=not first_window)
            window_start, first_window, window_loaded, window_teacher = now, False, 0, 0
            shown = [loss for s in active if (loss := _close_window(s, env, on_failed)) is not None]
            progress.update(done, shown, lrs[0])
        if done % rt.checkpoint_every == 0 or done == total_steps:
            for s in active:
                if env.is_main and s.failed is None:
                    s.save(done, total_steps)
            barrier(env)
    progress.close()
    if total_steps == 0 and env.is_main:
        for s in students:
            if s.failed is None:
                s.save(0, 0)
    barrier(env)
    return [_result(s, total_steps, device, env) for s in students]


def _student(index: int, cfg: RunConfig, run_dir: Path, logger: JsonlLogger, teacher: ClipTeacher | None,
             images_per_step: int, steps_per_epoch: int, total_steps: int, device: torch.device,
             env: DistEnv) -> _Student:
    """A student built (or resumed from its own checkpoint) and wrapped for the job's ranks."""
    p = cfg.pretrain
    model = build_model(cfg, teacher, env.rank).to(device)
    optimizer = build_optimizer(model, p.weight_decay, p.betas)
    s = _Student(index, cfg, Path(run_dir), logger, model, optimizer,
                 peak_lr=p.lr or scaled_lr(p.base_lr, images_per_step),
                 warmup_steps=round(p.warmup_epochs * steps_per_epoch), start_step=0, clock=_new_clock(),
                 watch=SectionTimer(device))
    try:
        state = load_latest(s.ckpt_path.parent)
    except CorruptCheckpoint as err:
        s.failed, state = str(err), None
    if state is not None:
        model.student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        s.start_step, s.clock = state["step"], _new_clock() | state["clock"]
        if env.is_main:  # the log as the checkpoint left it: what a killed attempt logged after it goes
            logger.drop_after(s.start_step, prefix="train/")
            logger.log_records(state.get("log", []))
            logger.flush()
        log.info("resuming %s from step %d of %d", s.run_dir.name, s.start_step, total_steps)
    if cfg.runtime.compile:
        model.student.compile()
    s.train_model = model
    if env.enabled:  # the fixed position tables need no broadcast; the teacher has no gradients
        s.train_model = DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    model.train()
    return s


def _close_window(s: _Student, env: DistEnv, on_failed: OnFailed) -> float | None:
    """Check and log a student's losses since the last window; its latest loss, or None when it
    went non-finite (it stops here) or had no step in the window."""
    if not s.window:
        return None
    losses = torch.stack([w[2] for w in s.window])
    if env.enabled:
        dist.all_reduce(losses, op=dist.ReduceOp.AVG)
    values = losses.tolist()  # the one device sync of the window
    window, s.window = s.window, []
    bad = [(step, v) for (step, _, _), v in zip(window, values) if not math.isfinite(v)]
    if bad:
        s.failed = (f"loss became {bad[0][1]} at step {bad[0][0] + 1}: lower pretrain.base_lr or set "
                    "pretrain.clip_grad")
        if env.is_main:  # this attempt is the one that counts: its finite steps are kept
            s.logger.flush()
        on_failed(s.index, s.failed)
        return None
    if env.is_main:
        for (step, step_lr, _), value in zip(window, values):
            s.logger.log_metrics({"train/loss": value, "train/lr": step_lr}, step=step + 1)
    s.clock["last_loss"] = values[-1]
    return values[-1]


def _result(s: _Student, total_steps: int, device: torch.device, env: DistEnv) -> PretrainResult | TrainingFailed:
    if s.failed is not None:
        return TrainingFailed(s.failed)
    clock = s.clock
    timed = clock["timed_seconds"] > 0
    result = PretrainResult(
        steps=total_steps, total_steps=total_steps, final_loss=clock["last_loss"],
        images_per_s=clock["timed_images"] / clock["timed_seconds"] if timed else math.nan,
        peak_memory_mb=peak_memory_mb(device), train_seconds=clock["loop_seconds"],
        checkpoint=s.ckpt_path, resumed_from=s.start_step, images_loaded=clock["images_loaded"],
        teacher_images=clock["teacher_images"], shared=bool(clock["shared"]))
    if s.start_step < total_steps and env.is_main:
        s.logger.log_metrics({"train/images_per_s": result.images_per_s,
                              "train/peak_memory_mb": result.peak_memory_mb}, step=total_steps)
        s.logger.flush()
    return result


def apportion(active: Sequence[_Student], wall: float, teacher_seconds: float, loaded: int, through_teacher: int,
              *, images_per_step: int, timed: bool) -> None:
    """Share a window of a group's loop among its active students: each gets its own compute
    (forward, backward, optimiser step), the teacher's time and images split equally among the
    students that need the teacher, and the rest (loading, masks, logging) split equally among
    all. The shares add up to the window's wall time: a group's cost is the sum of its cells'."""
    if not active:
        return
    own = [s.watch.take() for s in active]
    users = [s for s in active if s.needs_teacher] or list(active)
    rest = max(0.0, wall - sum(own) - teacher_seconds)
    for s, mine in zip(active, own):
        teacher_share = 1 / len(users) if s in users else 0.0
        seconds = mine + rest / len(active) + teacher_seconds * teacher_share
        s.clock["loop_seconds"] += seconds
        s.clock["images_loaded"] += loaded / len(active)
        s.clock["teacher_images"] += through_teacher * teacher_share
        if len(active) > 1:  # kept in the checkpoint: a later job that finishes it alone still knows
            s.clock["shared"] = 1.0
        if timed:  # the first window of an attempt holds start-up (workers, compilation)
            s.clock["timed_images"] += len(s.window) * images_per_step
            s.clock["timed_seconds"] += seconds


class ProgressBar:
    """A tqdm bar in a terminal; otherwise a plain line at most every 30 s (Slurm log files)."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = total
        self.bar = None
        self.last_line = 0.0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
        self.position = start

    def update(self, step: int, losses: Sequence[float], lr: float) -> None:
        """``losses``: each training student's latest (a group shows them all, in its order)."""
        if not self.enabled:
            return
        loss = "/".join(f"{value:.4f}" for value in losses) or "-"
        if self.bar is not None:
            self.bar.update(step - self.position)
            self.bar.set_postfix(loss=loss, lr=f"{lr:.2e}")
        elif time.monotonic() - self.last_line >= 30 or step == self.total:
            print(f"pretrain step {step}/{self.total} loss {loss} lr {lr:.3e}", flush=True)
            self.last_line = time.monotonic()
        self.position = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
