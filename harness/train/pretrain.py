"""The pretraining loop: MAE/MILAN recipe, resumable to the step, optionally distributed.

Per optimiser step: ``accum_steps`` micro-batches (teacher forward, student forward/backward
under bf16 autocast on CUDA), then AdamW at the scheduled lr. Every ``log_every`` steps the
per-step losses are gathered in one device sync (so the GPU is not stalled every step), checked
for non-finite values and logged. Checkpoints are atomic and hold everything needed to continue
exactly: weights, optimiser, step, RNG state; the data order is a function of (seed, epoch),
so a resumed run starts mid-epoch at the batch it would have drawn next.
"""

import logging
import math
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch.nn.parallel import DistributedDataParallel

from harness.config import RunConfig
from harness.data.datasets import image_folder, make_loader, pretrain_transform
from harness.milan import MilanPretrainer, build_pretrainer, build_teacher, needs_teacher
from harness.train.checkpoint import LATEST, load_latest, rng_state, save_atomic, set_rng_state
from harness.train.distributed import DistEnv, barrier
from harness.train.metrics_log import RunLogger
from harness.train.sampler import ResumableSampler
from harness.train.schedule import lr_at, scaled_lr

log = logging.getLogger(__name__)


class TrainingFailed(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message is the recorded reason."""


@dataclass(frozen=True)
class PretrainResult:
    steps: int
    total_steps: int
    final_loss: float
    images_per_s: float
    peak_memory_mb: float
    train_seconds: float  # wall time of the training loop, summed over all attempts
    checkpoint: Path
    resumed_from: int  # 0 for a fresh start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from harness.errors import ConfigError
        raise ConfigError("runtime.device=cuda but no CUDA device is visible: use auto or cpu")
    return torch.device(name)


def autocast_for(cfg: RunConfig, device: torch.device):
    """bf16 autocast on CUDA (auto/bf16); fp32 on CPU unless bf16 is asked for explicitly."""
    precision = cfg.pretrain.precision
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_model(cfg: RunConfig) -> MilanPretrainer:
    m = cfg.model
    teacher = None
    if needs_teacher(m.target, m.masking):
        teacher = build_teacher(cfg.teacher.model, cfg.teacher.pretrained, cfg.teacher.normalize)
    return build_pretrainer(size=m.size, img_size=m.img_size, target=m.target, decoder=m.decoder,
                            masking=m.masking, mask_ratio=m.mask_ratio, teacher=teacher,
                            norm_pix_loss=m.norm_pix_loss, decoder_embed_dim=m.decoder_width,
                            decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_heads)


def build_optimizer(model: MilanPretrainer, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    # The authors' groups (timm's add_weight_decay, no skip list): biases and 1-d parameters are
    # exempt, everything else decays, cls_token and mask_token ([1, 1, C]) included.
    groups = param_groups_weight_decay(model.student, cfg.pretrain.weight_decay)
    # fused AdamW is several times faster than the per-tensor loop, on CPU as on CUDA
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.pretrain.betas, fused=True)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def pretrain(cfg: RunConfig, run_dir: Path, logger: RunLogger, device: torch.device,
             env: DistEnv = DistEnv()) -> PretrainResult:
    """Pretrain (or continue pretraining) the cell ``cfg`` in ``run_dir``; rank 0 logs and saves."""
    p, rt = cfg.pretrain, cfg.runtime
    ckpt_path = run_dir / "checkpoints" / LATEST
    torch.manual_seed(cfg.seed * 1000 + env.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dataset = image_folder(cfg.data.root, cfg.data.train_split, pretrain_transform(cfg.model.img_size))
    images_per_step = p.batch_size * env.world_size * p.accum_steps
    steps_per_epoch = len(dataset) // images_per_step
    if steps_per_epoch == 0 and p.epochs:  # the untrained reference takes no step
        from harness.errors import ConfigError
        raise ConfigError(f"the training split has {len(dataset)} images, fewer than one step "
                          f"({images_per_step}): lower pretrain.batch_size or pretrain.accum_steps")
    # 0 epochs: the untrained encoder is saved as it is (a grid's random-init reference)
    total_steps = max(1, math.ceil(p.epochs * steps_per_epoch)) if p.epochs else 0
    warmup_steps = round(p.warmup_epochs * steps_per_epoch)
    peak_lr = p.lr or scaled_lr(p.base_lr, images_per_step)

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg, device)
    start_step, clock = 0, {"loop_seconds": 0.0, "timed_images": 0, "timed_seconds": 0.0, "last_loss": math.nan}
    state = load_latest(ckpt_path.parent)
    if state is not None:
        model.student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step, clock = state["step"], state["clock"]
        log.info("resuming %s from step %d of %d", run_dir.name, start_step, total_steps)
    if rt.compile:
        model.student.compile()
    train_model = model
    if env.enabled:  # the fixed position tables need no broadcast; the teacher has no gradients
        train_model = DistributedDataParallel(
            model, device_ids=[env.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)

    sampler = ResumableSampler(len(dataset), steps_per_epoch * images_per_step, seed=cfg.seed,
                               rank=env.rank, world_size=env.world_size)
    loader = make_loader(dataset, batch_size=p.batch_size, shuffle=False, num_workers=rt.num_workers,
                         drop_last=True, seed=cfg.seed, sampler=sampler)
    # Steps already in the log (a kill after the last checkpoint) are recomputed, not re-logged;
    # only rank 0 logs.
    logged_through = (logger.last_step("train/loss") or -1) if env.is_main else math.inf

    model.train()
    progress = _Progress(total_steps, start_step, enabled=env.is_main)
    window: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, loss on device)
    batches = None
    timing_start = timing_step = None  # throughput over whole windows, skipping this attempt's first
    loop_start = time.perf_counter()
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if batches is None or step_in_epoch == 0:
            sampler.set_epoch(epoch, start=step_in_epoch * p.batch_size * p.accum_steps)
            batches = iter(loader)
        lr = lr_at(step, base=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps, min_lr=p.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_loss = torch.zeros((), device=device)
        for micro in range(p.accum_steps):
            imgs, _ = next(batches)
            imgs = imgs.to(device, non_blocking=True)
            sync = micro == p.accum_steps - 1 or not env.enabled
            with (nullcontext() if sync else train_model.no_sync()), autocast_for(cfg, device):
                loss = train_model(imgs).loss
            (loss / p.accum_steps).backward()
            step_loss += loss.detach() / p.accum_steps
        if p.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.student.parameters(), p.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append((step, lr, step_loss))

        done = step + 1
        if done % rt.log_every == 0 or done == total_steps or done % rt.checkpoint_every == 0:
            losses = torch.stack([w[2] for w in window])
            if env.enabled:
                dist.all_reduce(losses, op=dist.ReduceOp.AVG)
            losses = losses.tolist()  # the one device sync of the window
            bad = [(s, v) for (s, _, _), v in zip(window, losses) if not math.isfinite(v)]
            if bad:
                raise TrainingFailed(f"loss became {bad[0][1]} at step {bad[0][0] + 1}: lower "
                                     "pretrain.base_lr or set pretrain.clip_grad")
            for (s, step_lr, _), value in zip(window, losses):
                if s + 1 > logged_through:
                    logger.log_metrics({"train/loss": value, "train/lr": step_lr}, step=s + 1)
            clock["last_loss"] = losses[-1]
            window.clear()
            progress.update(done, losses[-1], lr)
            now = time.perf_counter()
            if timing_start is not None:  # the first window holds start-up (workers, compilation)
                clock["timed_images"] += (done - timing_step) * images_per_step
                clock["timed_seconds"] += now - timing_start
            timing_start, timing_step = now, done
        if done % rt.checkpoint_every == 0 or done == total_steps:
            logger.flush()
            now = time.perf_counter()
            clock["loop_seconds"] += now - loop_start
            loop_start = now
            if env.is_main:
                save_atomic({"model": model.student.state_dict(), "optimizer": optimizer.state_dict(),
                             "step": done, "total_steps": total_steps, "rng": rng_state(),
                             "clock": clock, "config": cfg.to_dict()}, ckpt_path)
            barrier(env)
    progress.close()
    if total_steps == 0 and env.is_main:
        save_atomic({"model": model.student.state_dict(), "optimizer": optimizer.state_dict(), "step": 0,
                     "total_steps": 0, "rng": rng_state(), "clock": clock, "config": cfg.to_dict()}, ckpt_path)
    barrier(env)

    timed = clock["timed_seconds"] > 0
    result = PretrainResult(
        steps=total_steps, total_steps=total_steps, final_loss=clock["last_loss"],
        images_per_s=clock["timed_images"] / clock["timed_seconds"] if timed else math.nan,
        peak_memory_mb=peak_memory_mb(device), train_seconds=clock["loop_seconds"],
        checkpoint=ckpt_path, resumed_from=start_step)
    if start_step < total_steps and env.is_main:
        logger.log_metrics({"train/images_per_s": result.images_per_s,
                            "train/peak_memory_mb": result.peak_memory_mb}, step=total_steps)
        logger.flush()
    return result


class _Progress:
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

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.position)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif time.monotonic() - self.last_line >= 30 or step == self.total:
            print(f"pretrain step {step}/{self.total} loss {loss:.4f} lr {lr:.3e}", flush=True)
            self.last_line = time.monotonic()
        self.position = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
