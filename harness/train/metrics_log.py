"""Where a run's metrics go: a logger protocol, and the JSON-lines log every run keeps.

Resuming must leave no gap and no repeat in the logged steps. A run killed after its last
checkpoint has logged some steps past it; on resume those steps are recomputed (same data order,
restored RNG) but not logged again: ``last_step`` tells the loop where the log ends.
"""

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol


class RunLogger(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...

    def last_step(self, key: str) -> int | None: ...

    def flush(self) -> None: ...


class JsonlLogger:
    """Appends ``{"step": s, "time": unix seconds, "key": value, ...}`` lines to ``metrics.jsonl``
    in the run folder (the time lets MLflow receive the same point however often it is sent)."""

    def __init__(self, path: Path, flush_every: int = 1) -> None:
        self.path = path
        self.flush_every = flush_every
        self._pending: list[str] = []

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._pending.append(json.dumps({"step": step, "time": round(time.time(), 3),
                                         **{k: float(v) for k, v in metrics.items()}}))
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

