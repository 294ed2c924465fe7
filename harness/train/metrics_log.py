"""A run's metrics log, ``metrics.jsonl``: each (metric, step) once, with the values of the attempt
that counts.

A requeued or killed run resumes from its last checkpoint and computes the steps after it again
(exactly: :mod:`harness.train.pretrain`). So the log only ever holds what a checkpoint covers: the
pretraining loop keeps a window's lines pending, puts them into the checkpoint it writes, and
appends them to the file once the checkpoint is on disk (:meth:`JsonlLogger.flush`). A run that
resumes drops whatever the file holds past its checkpoint (:meth:`JsonlLogger.drop_after`) and
restores the checkpoint's lines (written again only where missing: a kill between the checkpoint
and the flush). The tracking mirror sends the file as it grows, so MLflow never sees a step that
an attempt later recomputes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from harness.core.files import write_atomic

Record = dict[str, float | int | None]


class JsonlLogger:
    """``{"step": s, "time": unix seconds, "key": value, ...}`` lines in ``metrics.jsonl``, held back
    until :meth:`flush` (the time lets MLflow receive the same point however often it is sent). A
    (key, step) the file already holds is never written again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._pending: list[Record] = []
        self._written: set[tuple[str, int | None]] | None = None  # read from the file on first use

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.log_records([{"step": step, "time": round(time.time(), 3), **{k: float(v) for k, v in metrics.items()}}])

    def log_records(self, records: Iterable[Record]) -> None:
        """Records as :meth:`pending` returns them; their metrics already in the file are left out."""
        written = self._keys()
        for record in records:
            fresh = {k: v for k, v in record.items() if k in ("step", "time") or (k, record["step"]) not in written}
            if len(fresh) > 2:
                self._pending.append(fresh)
                written.update((k, record["step"]) for k in fresh if k not in ("step", "time"))

    def pending(self) -> list[Record]:
        """The lines not written yet (a checkpoint keeps them: they are the steps it covers)."""
        return [dict(record) for record in self._pending]

    def flush(self) -> None:
        if self._pending:
            with self.path.open("a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in self._pending))
            self._pending.clear()

    def drop_after(self, step: int, prefix: str) -> None:
        """Remove the lines of ``prefix`` metrics past ``step`` (a killed attempt's, after the checkpoint
        a run resumes from); nothing pending survives either."""
        self._pending.clear()
        kept = [r for r in read_jsonl(self.path) if not (r.get("step") is not None and r["step"] > step
                                                         and any(k.startswith(prefix) for k in r))]
        text = "".join(json.dumps(record) + "\n" for record in kept)
        if self.path.is_file() and text != self.path.read_text():  # also a line torn by the kill
            write_atomic(self.path, text)
        self._written = None

    def last_step(self, key: str) -> int | None:
        last = None
        for record in read_jsonl(self.path):
            if key in record and record.get("step") is not None:
                last = record["step"]
        return last

    def _keys(self) -> set[tuple[str, int | None]]:
        if self._written is None:
            self._written = {(k, r.get("step")) for r in read_jsonl(self.path) for k in r if k not in ("step", "time")}
        return self._written


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
