"""Fine-tune throughput on 1 rank and on several (DDP over gloo on CPU, NCCL on GPUs).

Each configuration runs :func:`harness.evaluate.finetune` on the same synthetic images, with the
same effective batch, in as many spawned processes as it has ranks; the number is training
images per second (``finetune_train_seconds`` of rank 0). ``bench.py finetune-bench`` runs it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from harness.core.distributed import init_distributed, shutdown
from harness.evaluate.finetune import finetune
from harness.milan.presets import PRESETS
from harness.milan.weights import build_timm_vit


@dataclass(frozen=True)
class FinetuneSpeed:
    ranks: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, world: int, port: int, size: str, images: int, batch: int, epochs: int, out: mp.Queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = torch.device("cpu")
    env = init_distributed(device, timeout_min=10)
    img = 32 if PRESETS[size].patch_size == 4 else 224
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(images, 3, img, img, generator=generator),
                         torch.randint(0, 10, (images,), generator=generator))
    val = torch.utils.data.DataLoader(TensorDataset(data.tensors[0][:batch], data.tensors[1][:batch]), batch_size=batch)
    metrics = finetune(build_timm_vit(size, img), data, val, num_classes=10, epochs=epochs, batch_size=batch,
                       base_lr=1e-4, warmup_epochs=0, device=device)
    if rank == 0:
        out.put(metrics["finetune_train_seconds"])
    shutdown(env)


def run_finetune_speed(ranks: int, *, size: str = "vit_micro_patch4", images: int = 1024, batch: int = 64,
                       epochs: int = 2) -> FinetuneSpeed:
    """Images/s of fine-tuning `size` on `ranks` processes of this machine, at one effective batch."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, ranks, port, size, images, batch, epochs, out)) for r in range(ranks)]
    for proc in procs:
        proc.start()
    seconds = out.get(timeout=1800)
    for proc in procs:
        proc.join()
    steps = images // batch
    return FinetuneSpeed(ranks, steps * batch * epochs, seconds)
