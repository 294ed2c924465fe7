"""Training-step throughput and hardware efficiency of the MILAN objective.

One measured step = teacher forward (when the cell needs one) + student forward/backward + fused
AdamW step, the same step the pretraining loop runs. FLOPs come from torch's FlopCounterMode on
one step; ``peak_fraction`` divides the achieved FLOP rate by the dense-matmul peak of the same
device, measured in the same process just before.

FlopCounterMode only sees what dispatches to ops it has formulas for: the CPU flash-attention
kernel and nn.MultiheadAttention's fused inference path (the teacher's) are invisible to it. The
count therefore runs one step with the math attention backend and the teacher's attention off
its fast path, which computes the same values; the timed steps use the fast kernels.
"""

import itertools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from harness.milan.pretrainer import MilanPretrainer, build_pretrainer
from harness.milan.switches import needs_teacher
from harness.milan.teacher import build_teacher
from harness.milan.presets import PRESETS

COMBINATIONS = list(itertools.product(("pixel", "clip"), ("standard", "prompting"), ("random", "semantic")))


@dataclass(frozen=True)
class SpeedResult:
    target: str
    decoder: str
    masking: str
    size: str
    img_size: int
    batch_size: int
    device: str
    precision: str
    step_ms: float
    images_per_s: float
    gflops_per_image: float  # one training step's FLOPs per image (teacher forward included)
    achieved_gflops: float
    peak_gflops: float
    peak_fraction: float
    peak_memory_mb: float


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> float:
    """Dense square-matmul rate (GFLOP/s) on ``device``: the best of ``repeats`` timed products."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(repeats + 2):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _countable(model: MilanPretrainer) -> Iterator[None]:
    """Attention on paths FlopCounterMode sees: math SDPA, and the teacher's MHA off its fast path."""
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    for m in mha:
        m.training = True  # dropout is 0: same values, but not the fused inference kernel
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for m in mha:
            m.training = False


def measure(target: str, decoder: str, masking: str, *, size: str, img_size: int, batch_size: int,
            device: torch.device, precision: str, teacher_model: str, steps: int, warmup: int,
            compile: bool, peak_gflops: float) -> SpeedResult:
    torch.manual_seed(0)
    teacher = build_teacher(teacher_model, None) if needs_teacher(target, masking) else None
    model = build_pretrainer(size=size, img_size=img_size, target=target, decoder=decoder,
                             masking=masking, mask_ratio=0.75, teacher=teacher).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    imgs = torch.randn(batch_size, 3, img_size, img_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()

    def step() -> None:
        with autocast:
            loss = model(imgs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with _countable(model), counter:
        step()
    flops_per_step = counter.get_total_flops()
    if compile:
        model.student.compile()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    achieved = flops_per_step / seconds / 1e9
    return SpeedResult(target=target, decoder=decoder, masking=masking, size=size, img_size=img_size,
                       batch_size=batch_size, device=str(device), precision=precision,
                       step_ms=1000 * seconds, images_per_s=batch_size / seconds,
                       gflops_per_image=flops_per_step / batch_size / 1e9, achieved_gflops=achieved,
                       peak_gflops=peak_gflops, peak_fraction=achieved / peak_gflops,
                       peak_memory_mb=peak_mb)


def run_speed(combinations: list[tuple[str, str, str]], *, size: str, img_size: int, batch_size: int,
              device: torch.device, precision: str, teacher_model: str, steps: int, warmup: int,
              compile: bool = False) -> list[SpeedResult]:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak_gflops(device, dtype)
    return [measure(t, d, m, size=size, img_size=img_size, batch_size=batch_size, device=device,
                    precision=precision, teacher_model=teacher_model, steps=steps, warmup=warmup,
                    compile=compile, peak_gflops=peak)
            for t, d, m in combinations]


def default_teacher_for(size: str) -> str:
    """A teacher with the student's patch grid (random init: only its cost matters here)."""
    return {4: "milan-clip-tiny", 14: "ViT-L-14-quickgelu"}.get(PRESETS[size].patch_size, "ViT-B-16-quickgelu")


def as_dicts(results: list[SpeedResult]) -> list[dict]:
    return [asdict(r) for r in results]
