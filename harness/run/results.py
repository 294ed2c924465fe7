"""The metrics a run reports (``results.json``, then MLflow and the report): its own (pretraining
loss, throughput, memory, cost) and those of the evaluation protocols it selects (the registry,
:mod:`harness.evaluate.protocols`), and the order in which a grid picks its headline metric."""

from collections.abc import Iterable

from harness.evaluate.protocols import HEADLINE_ORDER, Metric, protocol_metrics

FINAL_LOSS = Metric("final_loss", "final training loss", higher_is_better=False)
RUN_METRICS: tuple[Metric, ...] = (
    FINAL_LOSS,
    Metric("images_per_s", "throughput (images/s)"),
    Metric("peak_memory_mb", "peak memory (MB)", higher_is_better=False),
    Metric("gpu_hours", "compute (GPU-hours)", higher_is_better=False),
    Metric("cpu_core_hours", "compute (CPU core-hours)", higher_is_better=False),
)
METRICS: dict[str, Metric] = {m.key: m for m in (*protocol_metrics(), *RUN_METRICS)}
# a grid's headline metric is the first of these its cells measure
HEADLINE_METRICS: tuple[str, ...] = (*(p.headline.key for p in HEADLINE_ORDER), FINAL_LOSS.key)


def headline_metric(protocols: Iterable[str]) -> str:
    """The headline metric of runs that select ``protocols``: the best-ranked protocol's, else the
    pretraining loss."""
    chosen = set(protocols)
    return next((p.headline.key for p in HEADLINE_ORDER if p.name in chosen), FINAL_LOSS.key)
