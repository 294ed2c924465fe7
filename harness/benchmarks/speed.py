"""Training-step throughput and hardware efficiency (``bench.py speed``), on a GPU or this CPU.

A measured step is the pretraining loop's own (:func:`harness.train.step.train_step`): the teacher's
forward once when a student needs it, the masks, each student's forward and backward under the
pretraining precision, each student's fused AdamW step. It runs on synthetic images already on the
device; the data loader is measured apart (:func:`loader_rate`), since a real node feeds a GPU
from several cores.

For each row: images per second per student, the step's FLOPs per image from the project's FLOP
counter (:mod:`harness.milan.flops`: every student's forward and backward, the teacher's forward
once), the achieved fraction of the device's dense bf16 (or fp32) matmul rate measured in the same
process (MFU), and the peak device memory. Rows: the three cells of the issue (MAE, CLIP targets,
full MILAN), eager and compiled; a group job of the grid's 8 cells (one teacher forward, 8
students); the largest batch that fits; the loader's images/s per CPU core.
"""

from __future__ import annotations

import itertools
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from harness.milan.flops import group_flops_per_image
from harness.milan.presets import PRESETS
from harness.milan.pretrainer import MilanPretrainer, build_pretrainer
from harness.milan.switches import needs_teacher
from harness.milan.teacher import ClipTeacher, build_teacher
from harness.train.data_stream import PretrainStream
from harness.train.step import SectionTimer, allow_tf32, build_optimizer, train_step

# The cells: MAE, CLIP targets alone, full MILAN (target, decoder, masking)
CELLS: dict[str, tuple[str, str, str]] = {
    "mae": ("pixel", "standard", "random"),
    "clip": ("clip", "standard", "random"),
    "milan": ("clip", "prompting", "semantic"),
}
GRID_CELLS = list(itertools.product(("pixel", "clip"), ("standard", "prompting"), ("random", "semantic")))
# off: eager; student: what runtime.compile does in the loop; all: the teacher compiled too
COMPILE_MODES = ("off", "student", "all")


@dataclass
class SpeedRow:
    """One measurement. ``images_per_s`` is per student (a group job serves every student each image)."""

    row: str  # cell name, "group of 8", "largest batch", "loader"
    compile: str
    batch: int
    students: int = 1
    step_ms: float = math.nan
    images_per_s: float = math.nan
    gflops_per_image: float = math.nan  # every student's forward+backward, the teacher's forward once
    achieved_tflops: float = math.nan
    mfu: float = math.nan  # achieved / the measured matmul peak
    peak_memory_gb: float = math.nan
    cores: int = 0  # loader rows: the CPU cores the loader used
    note: str = ""


@dataclass
class SpeedReport:
    device: str
    precision: str
    size: str
    img_size: int
    peak_tflops: float  # dense matmul, measured here
    torch_version: str
    rows: list[SpeedRow] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "rows"}, "rows": [asdict(r) for r in self.rows]}


@dataclass
class _Learner:
    """A student as :func:`harness.train.step.train_step` takes it."""

    model: MilanPretrainer
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: str
    watch: SectionTimer
    clip_grad: float | None = None


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    """Dense square-matmul rate (TFLOP/s) on ``device``: the best of ``repeats`` timed products."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 3):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def default_teacher_for(size: str) -> str:
    """A teacher with the student's patch grid (random init: only its cost matters here)."""
    return {4: "milan-clip-tiny", 14: "ViT-L-14-quickgelu"}.get(PRESETS[size].patch_size, "ViT-B-16-quickgelu")


def _model_fields(size: str, img_size: int, cell: tuple[str, str, str]) -> SimpleNamespace:
    target, decoder, masking = cell
    return SimpleNamespace(size=size, img_size=img_size, target=target, decoder=decoder, masking=masking,
                           mask_ratio=0.75, decoder_width=None, decoder_depth=None, decoder_heads=None)


class StepBench:
    """Students of the given cells (one teacher for those that need it) on ``device``, timed on the
    pretraining loop's own step."""

    def __init__(self, cells: Sequence[tuple[str, str, str]], *, size: str, img_size: int, device: torch.device,
                 precision: str, teacher_model: str, compile_mode: str) -> None:
        torch.manual_seed(0)
        allow_tf32(device)  # as the pretraining loop does
        self.device, self.precision, self.cells = device, precision, list(cells)
        self.teacher: ClipTeacher | None = None
        if any(needs_teacher(t, m) for t, _, m in cells):
            self.teacher = build_teacher(teacher_model, None).to(device)
        self.learners = []
        for target, decoder, masking in cells:
            model = build_pretrainer(size=size, img_size=img_size, target=target, decoder=decoder, masking=masking,
                                     mask_ratio=0.75, teacher=self.teacher if needs_teacher(target, masking) else None)
            model = model.to(device)
            if compile_mode in ("student", "all"):  # as runtime.compile does in the loop
                model.student.compile()
            self.learners.append(_Learner(model, model, build_optimizer(model, 0.05, (0.9, 0.95)), precision,
                                          SectionTimer(device)))
        if self.teacher is not None and compile_mode == "all":
            self.teacher.compile()
        teacher_fields = SimpleNamespace(model=teacher_model)
        self.flops_per_image = group_flops_per_image([(_model_fields(size, img_size, c), teacher_fields)
                                                      for c in cells])
        self.img_size = img_size

    def step(self, images: torch.Tensor, index: int) -> None:
        train_step(self.learners, [images], teacher=self.teacher, teacher_precision=self.precision,
                   lrs=[1e-4] * len(self.learners), seed=0, step=index, rank=0)

    def time(self, batch: int, steps: int, warmup: int) -> tuple[float, float]:
        """(seconds per step, peak memory in GB) at ``batch`` images per step."""
        images = torch.randn(batch, 3, self.img_size, self.img_size, device=self.device)
        for index in range(warmup):
            self.step(images, index)
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        for index in range(steps):
            self.step(images, warmup + index)
        _sync(self.device)
        return (time.perf_counter() - start) / steps, _peak_memory_gb(self.device)


def host_syncs(bench: StepBench, batch: int) -> list[str]:
    """Where one step waits for the GPU (CUDA's sync debug mode): each synchronising call's source line."""
    import warnings

    images = torch.randn(batch, 3, bench.img_size, bench.img_size, device=bench.device)
    bench.step(images, 0)
    _sync(bench.device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bench.step(images, 1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught]


def _row(name: str, bench: StepBench, compile_mode: str, batch: int, seconds: float, memory_gb: float,
         peak_tflops: float) -> SpeedRow:
    achieved = bench.flops_per_image * batch / seconds / 1e12
    return SpeedRow(name, compile_mode, batch, len(bench.cells), 1000 * seconds, batch / seconds,
                    bench.flops_per_image / 1e9, achieved, achieved / peak_tflops, memory_gb)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def largest_batch(cell: tuple[str, str, str], *, start: int, limit: int, make: Callable[[], StepBench],
                  device: torch.device) -> tuple[int, str]:
    """The largest power-of-two multiple of ``start`` (up to ``limit``) at which one training step
    of ``cell`` fits in the device's memory, and what stopped the search."""
    bench, batch, fitted = make(), start, 0
    while batch <= limit:
        try:
            bench.time(batch, steps=1, warmup=0)
        except torch.OutOfMemoryError:
            return fitted, f"out of memory at {batch}"
        fitted, batch = batch, batch * 2
        _release(device)
    return fitted, f"fits at the search's limit {limit}"


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> float:
    """``count`` JPEGs of ImageNet's typical size in an ImageFolder tree (one class): smooth colour
    fields with grain, quality 90, so that decoding costs what a photo's does. Returns their mean KB."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    target = folder / "train" / "synthetic"
    target.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field_ = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 12, field_.shape).astype(np.int16)
        path = target / f"{i:05d}.jpg"
        Image.fromarray(np.clip(field_ + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        total += path.stat().st_size
    return total / count / 1024


def loader_rate(root: Path, *, workers: int, img_size: int, batch: int = 64, seconds: float = 6.0) -> float:
    """Images/s through the pretraining loader (JPEG decode + RandomResizedCrop + flip + normalise,
    :func:`harness.data.datasets.pretrain_transform`) with ``workers`` processes (0: this one)."""
    from torch.utils.data import DataLoader

    from harness.data.datasets import image_folder, pretrain_transform

    dataset = image_folder(root, "train", pretrain_transform(img_size))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0)
    count, start, first = 0, 0.0, True
    while True:
        for images, _ in loader:
            if first:  # the workers' start-up is not the rate
                first, start = False, time.perf_counter()
                continue
            count += images.shape[0]
            if time.perf_counter() - start > seconds:
                return count / (time.perf_counter() - start)


def end_to_end_rate(bench: StepBench, root: Path, *, decode: str, workers: int, batch: int, steps: int,
                    warmup: int) -> float:
    """Images/s per student of the loop's data stream (:class:`harness.train.data_stream.PretrainStream`)
    feeding the loop's step: loading, augmenting or decoding, and training together."""
    stream = PretrainStream(str(root), "train", img_size=bench.img_size, decode=decode, batch_size=batch,
                            images_per_step=batch, num_workers=workers, seed=0, device=bench.device)
    epoch = 0
    stream.start(epoch)

    def next_batch() -> torch.Tensor:
        nonlocal epoch
        try:
            return stream.next()
        except StopIteration:
            epoch += 1
            stream.start(epoch)
            return stream.next()

    for index in range(warmup):
        bench.step(next_batch(), index)
    _sync(bench.device)
    start = time.perf_counter()
    for index in range(steps):
        bench.step(next_batch(), warmup + index)
    _sync(bench.device)
    return batch * steps / (time.perf_counter() - start)


def gpu_decode_rate(root: Path, *, img_size: int, device: torch.device, batch: int = 256,
                    seconds: float = 6.0) -> float:
    """Images/s of the same augmentation on the GPU: the JPEG bytes read on the CPU, decoded with
    ``torchvision.io.decode_jpeg`` on ``device``, cropped and resized there."""
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms import v2

    files = sorted((root / "train" / "synthetic").glob("*.jpg"))
    crop = v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for first in range(0, len(files) - batch + 1, batch):
            data = [read_file(str(f)) for f in files[first:first + batch]]
            images = decode_jpeg(data, device=device)
            _ = torch.stack([crop(image) for image in images]).float()
            count += batch
    _sync(device)
    return count / (time.perf_counter() - start)


def run_speed(*, cells: Sequence[str], size: str, img_size: int, batch: int, device: torch.device,
              precision: str, teacher_model: str, steps: int, warmup: int, compile_modes: Sequence[str],
              compiled_cells: Sequence[str], group: bool, max_batch: int | None, loader_workers: Sequence[int],
              end_to_end: Sequence[tuple[str, int]] = (), budget_s: float,
              echo: Callable[[str], None] = print) -> SpeedReport:
    """Every measurement asked for, in order, while the time budget lasts (a row the budget leaves
    out says so); each row is echoed as it is measured."""
    deadline = time.monotonic() + budget_s
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    report = SpeedReport(str(device) if device.type == "cpu" else torch.cuda.get_device_name(device), precision,
                         size, img_size, matmul_peak_tflops(device, dtype), torch.__version__)
    echo(f"{report.device}: dense {precision} matmul peak {report.peak_tflops:.1f} TFLOP/s; torch {torch.__version__}")

    def add(row: SpeedRow) -> None:
        report.rows.append(row)
        echo(f"  {row.row:<14} compile={row.compile:<7} batch={row.batch:<5} students={row.students} "
             f"{row.images_per_s:10.1f} images/s  {row.step_ms:9.1f} ms  MFU {row.mfu:6.1%}  "
             f"{row.peak_memory_gb:6.2f} GB  {row.note}")

    def measure(name: str, chosen: Sequence[tuple[str, str, str]], mode: str) -> None:
        if time.monotonic() > deadline:
            add(SpeedRow(name, mode, batch, len(chosen), note="skipped: time budget spent"))
            return
        try:
            bench = StepBench(chosen, size=size, img_size=img_size, device=device, precision=precision,
                              teacher_model=teacher_model, compile_mode=mode)
            seconds, memory = bench.time(batch, steps, warmup)
            add(_row(name, bench, mode, batch, seconds, memory, report.peak_tflops))
        except torch.OutOfMemoryError:
            add(SpeedRow(name, mode, batch, len(chosen), note="out of memory"))
        _release(device)

    # the rows every run needs first; the compiled ones last: each compilation takes a minute or more
    for name in cells:
        measure(name, [CELLS[name]], "off")
    if device.type == "cuda":
        syncs = host_syncs(StepBench([CELLS[cells[-1]]], size=size, img_size=img_size, device=device,
                                     precision=precision, teacher_model=teacher_model, compile_mode="off"), batch)
        add(SpeedRow("host syncs", "off", batch, note=f"{cells[-1]}: {len(syncs)} in a step: {', '.join(syncs[:8])}"))
        _release(device)
    if group:
        measure(f"group of {len(GRID_CELLS)}", GRID_CELLS, "off")
    if loader_workers and time.monotonic() < deadline:
        with tempfile.TemporaryDirectory() as tmp:
            kb = make_jpegs(Path(tmp), 512)
            for workers in loader_workers:
                rate = loader_rate(Path(tmp), workers=workers, img_size=img_size)
                add(SpeedRow("loader (CPU)", "-", 64, images_per_s=rate, cores=max(workers, 1),
                             note=f"{workers} worker(s): {rate / max(workers, 1):.0f} images/s per core; JPEG "
                                  f"{kb:.0f} KB, {os.cpu_count()} cores here"))
            if device.type == "cuda" and time.monotonic() < deadline:
                rate = gpu_decode_rate(Path(tmp), img_size=img_size, device=device)
                add(SpeedRow("loader (GPU)", "-", 256, images_per_s=rate, note="torchvision decode_jpeg on the GPU"))
    if max_batch and time.monotonic() < deadline:
        cell = CELLS[cells[-1]]

        def make() -> StepBench:
            return StepBench([cell], size=size, img_size=img_size, device=device, precision=precision,
                             teacher_model=teacher_model, compile_mode="off")
        fitted, why = largest_batch(cell, start=batch, limit=max_batch, make=make, device=device)
        add(SpeedRow("largest batch", "off", fitted, note=f"{cells[-1]}: {why}"))
        _release(device)
    for mode in (m for m in compile_modes if m != "off"):
        for name in (c for c in cells if c in compiled_cells):
            measure(name, [CELLS[name]], mode)
        if group:  # its students reuse the cells' compiled graphs where their architecture is the same
            measure(f"group of {len(GRID_CELLS)}", GRID_CELLS, mode)
    if end_to_end and time.monotonic() < deadline:
        # the last cell, compiled as the last mode, fed by the loop's own data stream
        mode, name = compile_modes[-1], cells[-1]
        bench = StepBench([CELLS[name]], size=size, img_size=img_size, device=device, precision=precision,
                          teacher_model=teacher_model, compile_mode=mode)
        with tempfile.TemporaryDirectory() as tmp:
            kb = make_jpegs(Path(tmp), 6 * batch)
            for decode, workers in end_to_end:
                if time.monotonic() > deadline:
                    break
                rate = end_to_end_rate(bench, Path(tmp), decode=decode, workers=workers, batch=batch, steps=steps,
                                       warmup=warmup)
                row = _row(f"{name} + loader", bench, mode, batch, batch / rate, _peak_memory_gb(device),
                           report.peak_tflops)
                row.cores, row.note = workers, f"data.decode={decode}, {workers} worker(s), JPEG {kb:.0f} KB"
                add(row)
        _release(device)
    return report


def feeding_lines(report: SpeedReport) -> list[str]:
    """How many CPU cores per GPU the measured steps need, from the loader's rate per core."""
    per_core = [r.images_per_s / r.cores for r in report.rows if r.row == "loader (CPU)" and r.cores]
    if not per_core:
        return []
    rate = max(per_core)
    lines = [f"loader: {rate:.0f} images/s per CPU core (best of the worker counts measured)"]
    for row in report.rows:
        if row.row in CELLS or row.row.startswith("group of"):
            if math.isfinite(row.images_per_s):
                # a group job loads each image once for all its students
                lines.append(f"  {row.row} (compile={row.compile}): {row.images_per_s:.0f} images/s needs "
                             f"{row.images_per_s / rate:.1f} cores per GPU")
    return lines
