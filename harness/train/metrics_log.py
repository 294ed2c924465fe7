"""Where a run's metrics go: a logger protocol, and the JSON-lines log every run keeps.

Resuming must leave no gap and no repeat in the logged steps. A run killed after its last
checkpoint has logged some steps past it; on resume those steps are recomputed (same data order,
restored RNG) but not logged again: ``last_step`` tells the loop where the log ends.
"""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class RunLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def last_step(self, key: str) -> int | None: ...

    def flush(self) -> None: ...


class JsonlLogger:
    """Appends ``{"step": s, "key": value, ...}`` lines to ``metrics.jsonl`` in the run folder."""

    def __init__(self, path: Path, flush_every: int = 1) -> None:
        self.path = path
        self.flush_every = flush_every
        self._pending: list[str] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._pending.append(json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}))
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            with self.path.open("a") as f:
                f.write("\n".join(self._pending) + "\n")
            self._pending.clear()

    def last_step(self, key: str) -> int | None:
        last = None
        for record in read_jsonl(self.path):
            if key in record and record.get("step") is not None:
                last = record["step"]
        return last


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a line torn by a kill mid-write is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class FanOutLogger:
    """Sends every call to several loggers (e.g. the JSON-lines log and MLflow)."""

    def __init__(self, *loggers: RunLogger) -> None:
        self.loggers = loggers

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, step)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def last_step(self, key: str) -> int | None:
        # The run's history ends where the most complete destination ends.
        steps = [s for s in (lg.last_step(key) for lg in self.loggers) if s is not None]
        return max(steps, default=None)
