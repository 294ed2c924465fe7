"""Parsing of squeue / scontrol output (no Slurm needed). Samples come from Slurm 22.05."""

from __future__ import annotations

import pytest

from harness.launch import slurm
from harness.launch.slurm import (
    SlurmJobState,
    expand_job_id,
    parse_scontrol_jobs,
    parse_squeue,
    resolve,
)

SQUEUE = """\
2_7|2|PENDING|0||Resources|
3|3|PENDING|0||Priority|
4_[0-3%1]|4|PENDING|0||Priority|
1|1|RUNNING|0|vm|None|
16_0|17|RUNNING|2|vm|None|
16_3|16|RUNNING|0|vm|None|
32|32|PENDING|0||ReqNodeNotAvail, UnavailableNodes:vm|
"""

# scontrol show job -o 4 (trimmed): the pending rest of an array, a running and a done task.
SCONTROL_ARRAY = (
    "JobId=4 ArrayJobId=4 ArrayTaskId=2-3 ArrayTaskThrottle=1 JobName=wrap UserId=root(0) "
    "JobState=PENDING Reason=JobArrayTaskLimit Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 NodeList= NumNodes=1 Command=(null) WorkDir=/tmp/sl "
    "StdOut=/tmp/sl/slurm-4_3.out Power= \n"
    "JobId=13 ArrayJobId=4 ArrayTaskId=1 ArrayTaskThrottle=1 JobName=wrap UserId=root(0) "
    "JobState=RUNNING Reason=None Requeue=1 Restarts=0 BatchFlag=1 NodeList=vm "
    "AllocNode:Sid=localhost:2030 ReqB:S:C:T=0:0:*:* CPUs/Task=1 Power= \n"
    "JobId=12 ArrayJobId=4 ArrayTaskId=0 ArrayTaskThrottle=1 JobName=wrap UserId=root(0) "
    "JobState=COMPLETED Reason=None Requeue=1 Restarts=1 ExitCode=0:0 NodeList=vm Power= \n"
)

SCONTROL_PLAIN = (
    "JobId=26 JobName=my job with spaces UserId=root(0) GroupId=root(0) MCS_label=N/A "
    "Priority=4294901750 Nice=0 Account=(null) QOS=(null) JobState=CANCELLED "
    "Reason=None Dependency=(null) Requeue=1 Restarts=3 BatchFlag=1 Reboot=0 "
    "ExitCode=0:15 RunTime=00:00:05 NodeList=vm BatchHost=vm Comment=a b=c "
    "Command=/bin/sh -c sleep WorkDir=/tmp Power= \n"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("123", ["123"]),
        ("123_4", ["123_4"]),
        ("123_[0-3]", ["123_0", "123_1", "123_2", "123_3"]),
        ("123_[0-3%1]", ["123_0", "123_1", "123_2", "123_3"]),
        ("123_[1,5-6]", ["123_1", "123_5", "123_6"]),
        ("123_[0-8:4]", ["123_0", "123_4", "123_8"]),
        (" 7_[2] ", ["7_2"]),
    ],
)
def test_expand_job_id(raw: str, expected: list[str]) -> None:
    assert expand_job_id(raw) == expected


def test_squeue_format_has_no_width() -> None:
    # ":|" = no fixed width (no truncation), "|" after each field; Reason last (free text).
    assert slurm.SQUEUE_FORMAT.endswith("Reason:|")
    assert slurm.SQUEUE_FORMAT.count(":|") == 6


def test_parse_squeue() -> None:
    rows = parse_squeue(SQUEUE)
    by_id = {state.job_id: (raw, state) for raw, state in rows}
    assert set(by_id) == {"2_7", "3", "4_0", "4_1", "4_2", "4_3", "1", "16_0", "16_3", "32"}
    assert by_id["2_7"] == ("2", SlurmJobState("2_7", "PENDING", "Resources", 0, None))
    assert by_id["4_3"][1] == SlurmJobState("4_3", "PENDING", "Priority", 0, None)
    assert by_id["1"][1] == SlurmJobState("1", "RUNNING", "", 0, "vm")
    assert by_id["16_0"] == ("17", SlurmJobState("16_0", "RUNNING", "", 2, "vm"))
    assert by_id["32"][1].reason == "ReqNodeNotAvail, UnavailableNodes:vm"


def test_parse_squeue_ignores_blank_and_garbage() -> None:
    assert parse_squeue("") == []
    assert parse_squeue("\n  \nslurm_load_jobs error\n") == []


def test_parse_scontrol_array() -> None:
    rows = parse_scontrol_jobs(SCONTROL_ARRAY)
    by_id = {state.job_id: (raw, state) for raw, state in rows}
    assert set(by_id) == {"4_0", "4_1", "4_2", "4_3"}
    assert by_id["4_3"] == ("4", SlurmJobState("4_3", "PENDING", "JobArrayTaskLimit", 0, None))
    assert by_id["4_1"] == ("13", SlurmJobState("4_1", "RUNNING", "", 0, "vm"))
    assert by_id["4_0"] == ("12", SlurmJobState("4_0", "COMPLETED", "", 1, "vm"))


def test_parse_scontrol_plain_with_spaces_in_values() -> None:
    [(raw, state)] = parse_scontrol_jobs(SCONTROL_PLAIN)
    assert raw == "26"
    assert state == SlurmJobState("26", "CANCELLED", "", 3, "vm")
    assert state.finished


def test_parse_scontrol_empty() -> None:
    assert parse_scontrol_jobs("") == []
    assert parse_scontrol_jobs("No jobs in the system\n") == []


def test_resolve_exact_task_and_raw_id() -> None:
    rows = parse_squeue(SQUEUE) + parse_scontrol_jobs(SCONTROL_ARRAY)
    assert resolve("16_0", rows) == SlurmJobState("16_0", "RUNNING", "", 2, "vm")
    # "17" is the numeric id of task 16_0
    assert resolve("17", rows) == SlurmJobState("17", "RUNNING", "", 2, "vm")
    assert resolve("3", rows) == SlurmJobState("3", "PENDING", "Priority", 0, None)
    assert resolve("99", rows) is None
    assert resolve("16_9", rows) is None


def test_resolve_array_as_a_whole() -> None:
    rows = parse_scontrol_jobs(SCONTROL_ARRAY)
    whole = resolve("4", rows)
    assert whole is not None
    assert (whole.job_id, whole.state, whole.node, whole.restarts) == ("4", "RUNNING", "vm", 1)
    done = [(r, SlurmJobState(s.job_id, "COMPLETED")) for r, s in rows]
    assert resolve("4", done) == SlurmJobState("4", "COMPLETED")
    failed = [
        (r, SlurmJobState(s.job_id, "FAILED", "NonZeroExitCode") if s.job_id == "4_1" else s)
        for r, s in done
    ]
    assert resolve("4", failed) == SlurmJobState("4", "FAILED", "NonZeroExitCode")


def test_job_states_with_fake_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """squeue first, scontrol per base id for what squeue no longer lists, UNKNOWN otherwise."""
    calls: list[list[str]] = []
    scontrol = {"4": SCONTROL_ARRAY, "26": SCONTROL_PLAIN, "77": ""}

    def fake_run(cmd: list[str], *, ok_if: str | None = None) -> str:
        calls.append(cmd)
        if cmd[0] == "squeue":
            return "1|1|RUNNING|0|vm|None|\n4_[2-3%1]|4|PENDING|0||JobArrayTaskLimit|\n"
        assert cmd[:4] == ["scontrol", "show", "job", "--oneliner"]
        return scontrol[cmd[4]]

    monkeypatch.setattr(slurm, "_run", fake_run)
    states = slurm.job_states(["1", "4_3", "4_0", "26", "77", "1"])
    assert list(states) == ["1", "4_3", "4_0", "26", "77"]
    assert states["1"].state == "RUNNING"
    assert states["4_3"] == SlurmJobState("4_3", "PENDING", "JobArrayTaskLimit", 0, None)
    assert states["4_0"] == SlurmJobState("4_0", "COMPLETED", "", 1, "vm")
    assert states["26"].state == "CANCELLED" and states["26"].restarts == 3
    assert states["77"] == SlurmJobState("77", "UNKNOWN")
    squeue_calls = [c for c in calls if c[0] == "squeue"]
    assert len(squeue_calls) == 1 and "--jobs=1,4_3,4_0,26,77" in squeue_calls[0]
    # one scontrol call per base id not (fully) answered by squeue
    assert sorted(c[4] for c in calls if c[0] == "scontrol") == ["26", "4", "77"]
    assert slurm.job_states([]) == {}


def test_missing_binaries_raise_slurm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert slurm.slurm_available() is False
    with pytest.raises(slurm.SlurmError, match="not found"):
        slurm.job_states(["1"])
