"""A run's evaluation: the protocols its config selects, from the registry
(:mod:`harness.evaluate.protocols`), on one encoder.

The frozen protocols come first, grouped by the features they read: each feature set is extracted
once (in shards over the ranks, kept in the run's evaluation folder until its protocols are done),
then each of its protocols runs on it. The protocols that train the encoder come after, each on
its own copy. Every rank calls this and takes part; rank 0 gets the metrics.
"""

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig
from harness.core.distributed import DistEnv, barrier
from harness.evaluate.protocols import PROTOCOLS, EvalContext, Protocol

Stage = Callable[[str, int | None], None]


def evaluate_encoder(vit: Any, cfg: RunConfig, device: torch.device, *, env: DistEnv = DistEnv(),
                     work_dir: Path | None = None, stage: Stage = lambda name, progress: None,
                     log: Callable[[Mapping[str, float], int], None] = lambda metrics, step: None
                     ) -> dict[str, float]:
    """The selected protocols on a timm ViT encoder; accuracies in percent, on rank 0 (other ranks
    get {}). With ``work_dir`` (a run's evaluation folder) each stage keeps its progress there, so
    a requeued job continues where it stopped. On rank 0, ``stage(name, progress)`` as each stage
    (features, then each protocol) starts and as it goes, and ``log(metrics, step)`` gets the
    curves of the protocols that train (the fine-tune's loss per epoch)."""
    ctx = EvalContext(cfg=cfg, device=device, rank=env.rank, world_size=env.world_size,
                      barrier=lambda: barrier(env), work_dir=work_dir, stage=stage, log=log)
    chosen = [PROTOCOLS[name] for name in PROTOCOLS if name in cfg.eval.protocols]
    metrics: dict[str, float] = {}
    frozen = [p for p in chosen if p.frozen]
    if frozen:
        start = time.perf_counter()
        for feature_set in dict.fromkeys(p.features for p in frozen):
            stage("features", None)
            features = feature_set.extract(vit, ctx)
            for protocol in (p for p in frozen if p.features == feature_set):
                metrics |= _run(protocol, features, ctx)
        metrics["eval/feature_seconds"] = time.perf_counter() - start
        if ctx.features_dir is not None and env.is_main:  # several GB at ImageNet scale; the metrics are kept
            shutil.rmtree(ctx.features_dir, ignore_errors=True)
    for protocol in (p for p in chosen if not p.frozen):
        metrics |= _run(protocol, vit, ctx)
    return metrics if env.is_main else {}


def _run(protocol: Protocol, given: Any, ctx: EvalContext) -> dict[str, float]:
    ctx.stage(protocol.name, None if protocol.frozen else 0)
    return protocol.run(given, ctx)
