"""Slurm job state without ``sacct``.

Clusters (and ``scripts/local-slurm.sh``) may run without accounting, where ``sacct`` only says
"Slurm accounting storage is disabled". This module reads job state from the controller
instead: one ``squeue`` call for the jobs it still lists as active, then
``scontrol show job -o <id>`` for the others (finished jobs stay there for ``MinJobAge``
seconds: 600 on the local cluster, Slurm's default is 300). After that the job is forgotten
and reported as ``UNKNOWN``; callers must remember terminal states they have seen.

Job ids are strings: ``"123"`` (a job; for an array job, the array as a whole), ``"123_4"``
(one array task, as submitit names them) or the task's own numeric id. Parsing is done by pure
functions on the command output (:func:`parse_squeue`, :func:`parse_scontrol_jobs`,
:func:`expand_job_id`) so it can be tested without Slurm.

How submitit 1.5.4 behaves on a cluster without accounting (observed on the local cluster,
Slurm 22.05):

* ``AutoExecutor(folder, cluster="slurm")`` submits fine (``sbatch`` with ``--signal=USR2@90``,
  ``--time``, no ``--requeue``; jobs are requeueable because ``JobRequeue=1``).
  ``map_array`` gives ids ``"<array>_<i>"``.
* ``job.state`` is always ``"UNKNOWN"`` (and ``job.get_info()`` is ``{}``): submitit polls
  ``sacct``, which exits 1; each poll logs a "Bypassing sacct error" warning.
* ``job.done()`` is True only once the result pickle exists; ``job.result()`` works for jobs
  that finish (a success or a raised exception, both written to the result pickle).
* A job killed before writing its result (``scancel``/``job.cancel()``, node failure, OOM,
  SIGKILL): ``done()`` stays False, also with ``force_check=True``, and ``result()`` /
  ``exception()`` / ``wait()`` block forever. Use :func:`job_states` to detect such jobs.
* ``scontrol requeue <id>`` on a running submitit job: the job is killed (COMPLETING, then
  PENDING with reason BeginTime, ``Restarts=1``), restarts after Slurm's requeue hold
  (``AuthInfo=cred_expire``: 120 s by default, 20 s on the local cluster, plus a scheduler
  pass), reruns the pickled function from the start (``SLURM_RESTART_COUNT=1``) and its
  result is then picked up by ``job.result()`` as usual. The job id does not change.
* USR2 (``scancel --signal=USR2 <id>``, or Slurm's ``--signal=USR2@90`` near the time
  limit) reaches the job's Python process. submitit treats it as a *timeout* when the job ran
  longer than ``min(0.8 * timeout, timeout - 10 min)``, which is always true for
  ``timeout_min <= 10``, otherwise as a *preemption*:
  - ``submitit.helpers.Checkpointable`` (either case): ``checkpoint()`` is pickled, the job
    requeues itself with ``scontrol requeue`` and resumes from the checkpointed state on
    restart (same job id, ``Restarts=1``); the final result arrives normally.
  - plain function, preemption: requeued and rerun from scratch, like ``scontrol requeue``.
  - plain function, timeout: not requeued; the job ends FAILED and ``result()`` raises
    ``FailedJobError`` (``UncompletedJobError: ... timed-out and not checkpointable``).
  Seen with ``timeout_min=3``: Slurm sent USR2 about 66 s after the start (not 90 s) and the
  Checkpointable resumed from its checkpoint. Slurm may send ``--signal`` up to its 30 s
  check period early, so with ``timeout_min=2`` USR2 came within 1 s of the start, before
  submitit had installed its handler: the default action killed the job (exit 140, FAILED,
  no result file, so ``result()`` hangs). Don't use a time limit under about 3 min with
  submitit's ``USR2@90``.
* When a node goes DOWN, Slurm requeues the job by itself (``Restarts`` goes up) and
  submitit's handler does not run: a Checkpointable restarts from its *last* checkpoint,
  and a plain function reruns from the start.
* submitit ignores SIGTERM/SIGCONT ("Bypassing signal"), so a cancelled job dies only at
  SIGKILL, ``KillWait`` seconds later (5 s on the local cluster, 30 s by default).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "FINISHED_STATES",
    "SlurmError",
    "SlurmJobState",
    "cancel",
    "default_partition",
    "expand_job_id",
    "job_states",
    "parse_scontrol_jobs",
    "parse_squeue",
    "partitions",
    "requeue",
    "resolve",
    "slurm_available",
]

#: States after which a job will not run again by itself (unless requeued by someone).
FINISHED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

#: ``squeue --Format`` fields; ``:|`` means "no fixed width, followed by |" (no truncation).
#: Reason comes last because it is free text.
_SQUEUE_FIELDS = ("JobArrayID", "JobID", "State", "RestartCnt", "NodeList", "Reason")
SQUEUE_FORMAT = ",".join(f"{field}:|" for field in _SQUEUE_FIELDS)

_TIMEOUT_S = 30.0
_INVALID_ID = "Invalid job id specified"


class SlurmError(RuntimeError):
    """A Slurm command failed (not installed, controller unreachable, bad request)."""


@dataclass(frozen=True)
class SlurmJobState:
    """State of one job or array task as the Slurm controller reports it.

    ``state`` is Slurm's state name (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT,
    PREEMPTED, REQUEUED, NODE_FAIL, OUT_OF_MEMORY, ...) or UNKNOWN when Slurm no longer
    knows the job. ``reason`` is Slurm's reason ("" instead of "None"), ``restarts`` the
    number of requeues, ``node`` the node list (None while pending).
    """

    job_id: str
    state: str
    reason: str = ""
    restarts: int = 0
    node: str | None = None

    @property
    def finished(self) -> bool:
        """True for terminal states (see :data:`FINISHED_STATES`)."""
        return self.state in FINISHED_STATES


# --------------------------------------------------------------------------- parsing


def _expand_indices(spec: str) -> list[int]:
    """Expand an array index spec such as ``0-7``, ``1,3-5``, ``0-15:4`` or ``0-3%1``."""
    spec = spec.split("%", 1)[0]  # drop the throttle ("%2")
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return out


def expand_job_id(job_id: str) -> list[str]:
    """Expand a job id as squeue prints it into single ids.

    ``"123"`` -> ``["123"]``; ``"123_4"`` -> ``["123_4"]``;
    ``"123_[0-2,5%2]"`` -> ``["123_0", "123_1", "123_2", "123_5"]``.
    """
    job_id = job_id.strip()
    base, sep, rest = job_id.partition("_")
    if not sep:
        return [job_id]
    if rest.startswith("[") and rest.endswith("]"):
        return [f"{base}_{i}" for i in _expand_indices(rest[1:-1])]
    return [job_id]


def _node(value: str) -> str | None:
    value = value.strip()
    return None if value in ("", "(null)", "None", "None assigned", "N/A") else value


def _reason(value: str) -> str:
    value = value.strip()
    return "" if value in ("None", "(null)") else value


def _state(value: str) -> str:
    # "CANCELLED by 0" (sacct style) or "COMPLETING+" style suffixes: keep the name only.
    match = re.match(r"[A-Z_]+", value.strip().upper())
    return match.group(0) if match else "UNKNOWN"


def _int(value: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        return 0


# A parsed row: (raw numeric job id, state of one job or array task).
Row = tuple[str, SlurmJobState]


def parse_squeue(text: str) -> list[Row]:
    """Parse ``squeue --noheader --Format=SQUEUE_FORMAT`` output.

    Rows for pending arrays (``123_[0-7]``) are expanded into one row per task.
    """
    rows: list[Row] = []
    n = len(_SQUEUE_FIELDS)
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", n - 1)
        if len(fields) < n:
            continue
        array_id, raw_id, state, restarts, nodes, reason = fields
        reason = reason[:-1] if reason.endswith("|") else reason
        for job_id in expand_job_id(array_id):
            rows.append(
                (
                    raw_id.strip(),
                    SlurmJobState(
                        job_id, _state(state), _reason(reason), _int(restarts), _node(nodes)
                    ),
                )
            )
    return rows


_KEY = r"[A-Za-z][\w/:.]*"
_FIELD_RE = re.compile(rf"({_KEY})=(.*?)(?=\s+{_KEY}=|\s*$)")


def _scontrol_fields(line: str) -> dict[str, str]:
    """``Key=Value Key2=Value with spaces ...`` -> dict (first occurrence of a key wins)."""
    fields: dict[str, str] = {}
    for key, value in _FIELD_RE.findall(line.strip()):
        fields.setdefault(key, value)
    return fields


def parse_scontrol_jobs(text: str) -> list[Row]:
    """Parse ``scontrol show job -o`` output (one record per line).

    Array records are keyed ``<ArrayJobId>_<ArrayTaskId>``; a record for the still-pending
    tasks of an array (``ArrayTaskId=2-7``) is expanded into one row per task.
    """
    rows: list[Row] = []
    for line in text.splitlines():
        fields = _scontrol_fields(line)
        raw_id = fields.get("JobId")
        if not raw_id:
            continue
        array_job = fields.get("ArrayJobId")
        task_spec = fields.get("ArrayTaskId")
        if array_job and task_spec and task_spec != "N/A":
            ids = [f"{array_job}_{i}" for i in _expand_indices(task_spec)]
        else:
            ids = [raw_id]
        for job_id in ids:
            state = SlurmJobState(
                job_id,
                _state(fields.get("JobState", "UNKNOWN")),
                _reason(fields.get("Reason", "")),
                _int(fields.get("Restarts", "0")),
                _node(fields.get("NodeList", "")),
            )
            rows.append((raw_id, state))
    return rows


_RUNNING_FIRST = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED")


def _aggregate(job_id: str, tasks: Sequence[SlurmJobState]) -> SlurmJobState:
    """State of a whole array from its tasks: active if any task is, else the worst end."""
    active = [t for t in tasks if not t.finished]
    if active:
        pick = next((t for t in active if t.state in _RUNNING_FIRST), active[0])
    else:
        pick = next((t for t in tasks if t.state != "COMPLETED"), tasks[0])
    restarts = max(t.restarts for t in tasks)
    return SlurmJobState(job_id, pick.state, pick.reason, restarts, pick.node)


def resolve(job_id: str, rows: Sequence[Row]) -> SlurmJobState | None:
    """Find ``job_id`` among parsed rows (exact id, then array as a whole, then raw id)."""
    for _, state in rows:
        if state.job_id == job_id:
            return state
    if "_" not in job_id:
        tasks = [s for _, s in rows if s.job_id.startswith(job_id + "_")]
        if tasks:
            return _aggregate(job_id, tasks)
        for raw_id, state in rows:
            if raw_id == job_id:
                return SlurmJobState(job_id, state.state, state.reason, state.restarts, state.node)
    return None


# --------------------------------------------------------------------------- commands


def _run(cmd: list[str], *, ok_if: str | None = None) -> str:
    """Run a Slurm command and return stdout; raise SlurmError on failure.

    If the command fails with ``ok_if`` in its stderr, return its stdout instead.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise SlurmError(f"{cmd[0]} not found: is Slurm installed and on PATH?") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(cmd)} did not answer within {_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0 and not (ok_if and ok_if in proc.stderr):
        raise SlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def slurm_available() -> bool:
    """True if ``sinfo`` is on PATH and the controller answers."""
    if shutil.which("sinfo") is None:
        return False
    try:
        _run(["sinfo", "--noheader", "--format=%P"])
    except SlurmError:
        return False
    return True


def _sinfo_partitions() -> list[str]:
    names: list[str] = []
    for line in _run(["sinfo", "--noheader", "--format=%P"]).split():
        if line not in names:
            names.append(line)
    return names


def partitions() -> list[str]:
    """Names of the partitions sinfo lists, in its order."""
    return [name.rstrip("*") for name in _sinfo_partitions()]


def default_partition() -> str | None:
    """The default partition (marked ``*`` by sinfo), or None if there is none."""
    return next((n.rstrip("*") for n in _sinfo_partitions() if n.endswith("*")), None)


def _base_id(job_id: str) -> str:
    return job_id.split("_", 1)[0]


def job_states(job_ids: Iterable[str]) -> dict[str, SlurmJobState]:
    """State of each job id, from squeue (active jobs) then scontrol (recently finished).

    Ids Slurm does not know (anymore) map to state ``UNKNOWN``. Raises :class:`SlurmError`
    if Slurm cannot be asked (as opposed to not knowing a job).
    """
    ids = list(dict.fromkeys(str(j).strip() for j in job_ids))
    result: dict[str, SlurmJobState] = {}
    if not ids:
        return result
    out = _run(
        ["squeue", "--noheader", "--array", f"--jobs={','.join(ids)}", f"--Format={SQUEUE_FORMAT}"],
        ok_if=_INVALID_ID,
    )
    rows = parse_squeue(out)
    missing: list[str] = []
    for job_id in ids:
        found = resolve(job_id, rows)
        # An array that squeue still lists may have tasks that already finished: ask scontrol.
        if found is None or any(s.job_id.startswith(job_id + "_") for _, s in rows):
            missing.append(job_id)
        else:
            result[job_id] = found
    scontrol_rows: dict[str, list[Row]] = {}
    for job_id in missing:
        base = _base_id(job_id)
        if base not in scontrol_rows:
            scontrol_rows[base] = parse_scontrol_jobs(
                _run(["scontrol", "show", "job", "--oneliner", base], ok_if=_INVALID_ID)
            )
        found = resolve(job_id, scontrol_rows[base]) or resolve(job_id, rows)
        result[job_id] = found or SlurmJobState(job_id, "UNKNOWN")
    return {job_id: result[job_id] for job_id in ids}


def requeue(job_id: str) -> None:
    """``scontrol requeue <job_id>`` (the job must be requeueable, e.g. ``JobRequeue=1``)."""
    _run(["scontrol", "requeue", str(job_id)])


def cancel(job_ids: Iterable[str]) -> None:
    """``scancel`` the given job ids (no-op for an empty list)."""
    ids = [str(j) for j in job_ids]
    if ids:
        _run(["scancel", *ids])
