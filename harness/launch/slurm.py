"""Slurm job state without ``sacct``.

Clusters (and ``scripts/local-slurm.sh``) may run without accounting, where ``sacct`` only says
"Slurm accounting storage is disabled". Job state comes from the controller instead: ``squeue``
for the jobs it still lists, then ``scontrol show job -o <id>``, which keeps finished jobs for
``MinJobAge`` seconds (300 by default, 600 on the local cluster). After that a job is ``UNKNOWN``:
callers must remember the terminal states they have seen. Job ids are strings: ``"123"`` (a job,
or an array as a whole), ``"123_4"`` (an array task, as submitit names them) or the task's own id.

submitit 1.5.4 without accounting (observed on the local cluster, Slurm 22.05):

* ``job.state`` is always ``"UNKNOWN"`` (submitit polls ``sacct``). ``job.done()`` turns True only
  when the result pickle exists: for a job killed before writing it (``scancel``, node failure,
  OOM, SIGKILL), ``result()``, ``exception()`` and ``wait()`` block forever. Use :func:`job_states`.
* ``scontrol requeue`` kills a running job and restarts it under the same id with ``Restarts=1``
  after Slurm's requeue hold (``AuthInfo=cred_expire``: 120 s by default, 20 s on the local cluster).
* USR2 (``--signal=USR2@90`` near the time limit, or preemption) makes submitit call a
  ``Checkpointable``'s ``checkpoint()`` and requeue it. Slurm may send it up to its 30 s check
  period early: with ``timeout_min=2`` it came before submitit had installed its handler and
  killed the job. Keep time limits at 3 min or more.
* A node that goes DOWN: Slurm requeues the job itself and submitit's handler does not run, so a
  Checkpointable restarts from its *last* checkpoint.
* submitit ignores SIGTERM ("Bypassing signal"): a cancelled job dies at SIGKILL, ``KillWait``
  seconds later (30 s by default, 5 s on the local cluster).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# States after which a job will not run again unless someone requeues it.
FINISHED_STATES = frozenset({"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL",
                             "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT"})
# ``squeue --Format`` fields; ``:|`` is "no fixed width (no truncation), then |". Reason, free text, last.
_SQUEUE_FIELDS = ("JobArrayID", "JobID", "State", "RestartCnt", "NodeList", "Reason")
SQUEUE_FORMAT = ",".join(f"{field}:|" for field in _SQUEUE_FIELDS)
_TIMEOUT_S = 30.0
_INVALID_ID = "Invalid job id specified"


class SlurmError(RuntimeError):
    """A Slurm command failed (not installed, controller unreachable, bad request)."""


@dataclass(frozen=True)
class SlurmJobState:
    """One job or array task as the controller reports it: Slurm's state name (UNKNOWN once Slurm
    has forgotten the job), its reason ("" for "None"), requeue count and node list (None while pending)."""

    job_id: str
    state: str
    reason: str = ""
    restarts: int = 0
    node: str | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def parse(cls, job_id: str, state: str, reason: str, restarts: str, node: str) -> SlurmJobState:
        """From the text fields of squeue or scontrol: "CANCELLED by 0" and "COMPLETING+" give the
        state name only; Slurm's spellings of "none" give "" (reason) and None (node)."""
        name = re.match(r"[A-Z_]+", state.strip().upper())
        node = node.strip()
        return cls(job_id, name.group(0) if name else "UNKNOWN", "" if reason.strip() in ("None", "(null)")
                   else reason.strip(), int(restarts) if restarts.strip().isdigit() else 0,
                   None if node in ("", "(null)", "None", "None assigned", "N/A") else node)


# --------------------------------------------------------------------------- parsing

def _expand_indices(spec: str) -> list[int]:
    """An array index spec such as ``0-7``, ``1,3-5``, ``0-15:4`` or ``0-3%1`` (throttled)."""
    out: list[int] = []
    for part in filter(None, spec.split("%", 1)[0].split(",")):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return out


def expand_job_id(job_id: str) -> list[str]:
    """A job id as squeue prints it, as single ids: ``"123_[0-2,5%2]"`` -> ``123_0``, ``123_1``,
    ``123_2``, ``123_5``; ``"123"`` and ``"123_4"`` stay as they are."""
    job_id = job_id.strip()
    base, _, rest = job_id.partition("_")
    if rest.startswith("[") and rest.endswith("]"):
        return [f"{base}_{i}" for i in _expand_indices(rest[1:-1])]
    return [job_id]


Row = tuple[str, SlurmJobState]  # (the raw numeric job id, one job or array task)


def parse_squeue(text: str) -> list[Row]:
    """``squeue --noheader --Format=SQUEUE_FORMAT`` output; a pending array (``123_[0-7]``) gives
    one row per task."""
    rows: list[Row] = []
    for line in text.splitlines():
        fields = line.split("|", len(_SQUEUE_FIELDS) - 1)
        if len(fields) < len(_SQUEUE_FIELDS):
            continue
        array_id, raw_id, state, restarts, nodes, reason = fields
        reason = reason.removesuffix("|")
        rows += [(raw_id.strip(), SlurmJobState.parse(job_id, state, reason, restarts, nodes))
                 for job_id in expand_job_id(array_id)]
    return rows


_KEY = r"[A-Za-z][\w/:.]*"
_FIELD_RE = re.compile(rf"({_KEY})=(.*?)(?=\s+{_KEY}=|\s*$)")  # values may hold spaces


def parse_scontrol_jobs(text: str) -> list[Row]:
    """``scontrol show job -o`` output, one record per line. Array tasks are keyed
    ``<ArrayJobId>_<ArrayTaskId>``; the record of an array's pending rest (``ArrayTaskId=2-7``)
    gives one row per task."""
    rows: list[Row] = []
    for line in text.splitlines():
        fields: dict[str, str] = {}
        for key, value in _FIELD_RE.findall(line.strip()):
            fields.setdefault(key, value)  # the first occurrence of a key wins
        if not (raw_id := fields.get("JobId")):
            continue
        array_job, tasks = fields.get("ArrayJobId"), fields.get("ArrayTaskId")
        ids = [f"{array_job}_{i}" for i in _expand_indices(tasks)] if array_job and tasks and tasks != "N/A" \
            else [raw_id]
        rows += [(raw_id, SlurmJobState.parse(job_id, fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""),
                                              fields.get("Restarts", "0"), fields.get("NodeList", "")))
                 for job_id in ids]
    return rows


_RUNNING_FIRST = ("RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED")


def _aggregate(job_id: str, tasks: Sequence[SlurmJobState]) -> SlurmJobState:
    """A whole array from its tasks: active if any task is (running first), else the worst end."""
    if active := [t for t in tasks if not t.finished]:
        pick = next((t for t in active if t.state in _RUNNING_FIRST), active[0])
    else:
        pick = next((t for t in tasks if t.state != "COMPLETED"), tasks[0])
    return SlurmJobState(job_id, pick.state, pick.reason, max(t.restarts for t in tasks), pick.node)


def resolve(job_id: str, rows: Sequence[Row]) -> SlurmJobState | None:
    """``job_id`` among parsed rows: the exact id, then an array as a whole, then a raw id."""
    for _, state in rows:
        if state.job_id == job_id:
            return state
    if "_" not in job_id:
        if tasks := [s for _, s in rows if s.job_id.startswith(job_id + "_")]:
            return _aggregate(job_id, tasks)
        for raw_id, s in rows:
            if raw_id == job_id:
                return SlurmJobState(job_id, s.state, s.reason, s.restarts, s.node)
    return None


# --------------------------------------------------------------------------- commands

def _run(cmd: list[str], *, ok_if: str | None = None) -> str:
    """stdout of a Slurm command; SlurmError if it fails, unless ``ok_if`` is in its stderr."""
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
    try:
        return shutil.which("sinfo") is not None and bool(partitions())
    except SlurmError:
        return False


def partitions() -> tuple[list[str], str | None]:
    """The partitions sinfo lists, in its order, and the default one (marked ``*``) or None."""
    names = list(dict.fromkeys(_run(["sinfo", "--noheader", "--format=%P"]).split()))
    return [n.rstrip("*") for n in names], next((n.rstrip("*") for n in names if n.endswith("*")), None)


def node_shape(partition: str | None) -> tuple[int, int]:
    """(CPUs, GPUs) of the largest node of ``partition`` (of any partition when None), from sinfo."""
    rows = _run(["sinfo", "--noheader", "--format=%c %G", *(["--partition", partition] if partition else [])])
    cpus = gpus = 0
    for line in rows.splitlines():
        count, _, gres = line.partition(" ")
        cpus = max(cpus, int(count.rstrip("+")) if count.rstrip("+").isdigit() else 0)
        gpus = max(gpus, sum(int(m) for m in re.findall(r"gpu(?::[\w-]+)?:(\d+)", gres)))
    return cpus, gpus


def job_states(job_ids: Iterable[str]) -> dict[str, SlurmJobState]:
    """Each job id's state, from squeue (active jobs) then scontrol (recently finished); ``UNKNOWN``
    for ids Slurm does not know (any more). SlurmError when Slurm cannot be asked."""
    ids = list(dict.fromkeys(str(j).strip() for j in job_ids))
    if not ids:
        return {}
    rows = parse_squeue(_run(["squeue", "--noheader", "--array", f"--jobs={','.join(ids)}",
                              f"--Format={SQUEUE_FORMAT}"], ok_if=_INVALID_ID))
    result: dict[str, SlurmJobState] = {}
    scontrol_rows: dict[str, list[Row]] = {}
    for job_id in ids:
        found = resolve(job_id, rows)
        # An array squeue still lists may have tasks that already finished: ask scontrol too.
        if found is not None and not any(s.job_id.startswith(job_id + "_") for _, s in rows):
            result[job_id] = found
            continue
        base = job_id.split("_", 1)[0]
        if base not in scontrol_rows:
            scontrol_rows[base] = parse_scontrol_jobs(_run(["scontrol", "show", "job", "--oneliner", base],
                                                           ok_if=_INVALID_ID))
        result[job_id] = resolve(job_id, scontrol_rows[base]) or found or SlurmJobState(job_id, "UNKNOWN")
    return result


def cancel(job_ids: Iterable[str]) -> None:
    if ids := [str(j) for j in job_ids]:
        _run(["scancel", *ids])
