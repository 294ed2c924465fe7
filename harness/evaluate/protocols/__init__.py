"""The registry of evaluation protocols: every reader (config validation, the headline-metric order,
the MLflow schema, report labels and figures, the rehearsal, the preflight, the runner) finds a
protocol here by name. A protocol is one module of declarations (:mod:`.spec`) registered below.

Adding a protocol: write its module (settings, metrics, runner, micro scale, checks: see
:mod:`.classification`) and add it to ``_MODULES``.
"""

from harness.evaluate.protocols import classification, segmentation
from harness.evaluate.protocols.spec import EvalContext, FeatureSet, Metric, Protocol

_MODULES = (classification, segmentation)

PROTOCOLS: dict[str, Protocol] = {p.name: p for module in _MODULES for p in module.PROTOCOLS}
# the selection of a config that names none
DEFAULT_PROTOCOLS: tuple[str, ...] = tuple(name for name, p in PROTOCOLS.items() if p.on_by_default)
# the protocols in the order a grid picks its headline metric (each one's first) among those it runs
HEADLINE_ORDER: tuple[Protocol, ...] = tuple(sorted(PROTOCOLS.values(), key=lambda p: p.headline_rank))


def protocol_metrics() -> tuple[Metric, ...]:
    """Every metric a protocol can produce, protocol by protocol in registry order."""
    return tuple(m for p in PROTOCOLS.values() for m in p.metrics)


__all__ = ["DEFAULT_PROTOCOLS", "HEADLINE_ORDER", "PROTOCOLS", "EvalContext", "FeatureSet", "Metric", "Protocol",
           "protocol_metrics"]
