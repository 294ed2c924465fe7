"""What an evaluation protocol declares, once: its config section, the metrics it produces, whether
it runs on frozen features (shared with the other frozen protocols) or trains the encoder, its
runner, its micro scale for a rehearsal and its preflight checks. Every other part of the harness
reads these declarations through the registry (:mod:`harness.evaluate.protocols`).

Declarations import nothing heavy: the config, ``status`` and the Slurm submission read them
without torch (about 2 s to import here, against 0.2 s for ``bench.py status``), so a runner
imports its evaluation code when it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.core.errors import UserError
from harness.core.frozen import FrozenModel

if TYPE_CHECKING:
    import torch


FEATURES_DIR = "features"


@dataclass(frozen=True)
class Metric:
    """One number a run reports: its key in results.json and MLflow, its label with unit in
    tables and figures, and which way is better."""

    key: str
    label: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class EvalContext:
    """What a runner gets besides its features or its encoder. ``cfg`` is the run's
    :class:`~harness.config.RunConfig`: the data, the seed, the runtime, and the protocol's own
    settings under ``cfg.eval.<name>``."""

    cfg: Any
    device: torch.device
    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = lambda: None  # waits for every rank of the job
    # the run's evaluation folder: each stage keeps its progress there (None: nothing is kept)
    work_dir: Path | None = None
    stage: Callable[[str, int | None], None] = lambda name, progress: None  # status: stage and progress
    log: Callable[[Mapping[str, float], int], None] = lambda metrics, step: None  # curves (rank 0)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def features_dir(self) -> Path | None:
        """Where the frozen features' shards are kept (removed once the frozen protocols are done)."""
        return self.work_dir / FEATURES_DIR if self.work_dir is not None else None


@dataclass(frozen=True)
class FeatureSet:
    """Frozen features that several protocols read: extracted once per run, however many of its
    protocols a run selects. ``extract(encoder, ctx)`` returns what its protocols take."""

    name: str
    extract: Callable[[Any, EvalContext], Any]


def check_batch_splits(protocol: str, batch_size: int, world: int) -> None:
    """A protocol's effective batch splits over the cell's ``world`` tasks (a one-line UserError)."""
    if batch_size % world:
        raise UserError(f"eval.{protocol}.batch_size={batch_size} does not split over the cell's {world} tasks "
                        f"(resources): make it a multiple of {world}")


def _no_check(settings: Any, world: int) -> None:
    return None


def _no_data_check(cfg: Any) -> None:
    return None


@dataclass(frozen=True)
class Protocol:
    """One evaluation protocol. ``run(features, ctx)`` for a frozen protocol (``features`` from its
    :class:`FeatureSet`), ``run(encoder, ctx)`` for one that trains the encoder; either returns its
    metrics on rank 0 (other ranks may return anything: the caller keeps rank 0's)."""

    name: str  # its name in eval.protocols, and its config section eval.<name>
    settings: type[FrozenModel]
    metrics: tuple[Metric, ...]  # the first is its headline metric
    run: Callable[[Any, EvalContext], dict[str, float]]
    features: FeatureSet | None = None  # None: it trains the encoder
    # the grid's headline metric is the first protocol's, by this rank, among the protocols it runs
    headline_rank: int = 100
    on_by_default: bool = False  # selected when a config names no protocols
    # its settings at a rehearsal's micro scale, for a cell of ``world`` tasks: overrides of eval.<name>
    micro: Callable[[Any, int], Mapping[str, Any]] = field(default=lambda settings, world: {})
    # checks that need no files: its settings against a cell's ``world`` tasks (one-line UserError)
    check_settings: Callable[[Any, int], None] = _no_check
    # checks of the data it reads, given the run config (one-line UserError)
    check_data: Callable[[Any], None] = _no_data_check

    @property
    def frozen(self) -> bool:
        return self.features is not None

    @property
    def headline(self) -> Metric:
        return self.metrics[0]
