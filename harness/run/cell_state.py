"""The one model of a cell's state, shared by the run, ``status``, ``ablate``, MLflow and the report.

A cell's truth lives in its run folder (``status.json``, written only by
:mod:`harness.run.folder`); the scheduler adds whether a job is alive; MLflow mirrors the
folder (the ``status`` tag and the run status below). Every component names states through
:class:`CellState`, never through string literals of its own.
"""

from __future__ import annotations

from enum import Enum


class CellState(str, Enum):
    MISSING = "missing"      # never submitted
    PENDING = "pending"      # submitted, waiting for the scheduler
    RUNNING = "running"
    REQUEUED = "requeued"    # stopped by the scheduler (requeue, time limit); resumes on restart
    PREEMPTED = "preempted"  # stopped by preemption; resumes when rescheduled
    DONE = "done"
    FAILED = "failed"        # with a reason: the run's own error, a non-finite loss, OOM, a node failure

    def __str__(self) -> str:
        return self.value

    @property
    def active(self) -> bool:
        """Queued, running or about to run again: a cell in this state must not be resubmitted."""
        return self in ACTIVE

    @property
    def terminal(self) -> bool:
        return self in (CellState.DONE, CellState.FAILED)

    @classmethod
    def parse(cls, text: str | None, default: CellState | None = None) -> CellState | None:
        """The state named ``text``, or ``default`` for anything else (a missing or foreign value)."""
        return cls._value2member_map_.get(text, default) if isinstance(text, str) else default


ACTIVE = frozenset({CellState.PENDING, CellState.RUNNING, CellState.REQUEUED, CellState.PREEMPTED})
