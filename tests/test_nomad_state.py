"""Mapping Nomad's allocation and evaluation JSON to pyexec's verdicts (no agent needed)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pyexec.models import Reason
from pyexec.runner import nomad_state as state

STARTED = "2026-01-02T03:04:05.123456789Z"
FINISHED = "2026-01-02T03:04:07.5Z"
ZERO = "0001-01-01T00:00:00Z"


def task(
    status: str, *, started: str | None = STARTED, finished: str = ZERO, **terminated: str
) -> dict[str, Any]:
    events = [{"Type": "Started"}]
    if terminated:
        events.append({"Type": "Terminated", "Details": terminated})
    return {"State": status, "StartedAt": started, "FinishedAt": finished, "Events": events}


def alloc(
    client: str = "complete", desired: str = "run", **tasks: dict[str, Any]
) -> dict[str, Any]:
    return {"ID": "a1", "ClientStatus": client, "DesiredStatus": desired, "TaskStates": tasks}


def done(**overrides: dict[str, Any]) -> dict[str, Any]:
    tasks = {
        "run": task("dead", finished=FINISHED, exit_code="0"),
        "finish": task("dead", exit_code="0"),
    }
    tasks.update(overrides)
    return tasks


def test_parse_time_keeps_microseconds_of_nanosecond_stamps() -> None:
    """Nomad's nanosecond RFC 3339 times parse; Go's zero time means never."""
    assert state.parse_time(STARTED) == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert state.parse_time(ZERO) is None
    assert state.parse_time(None) is None


def test_failed_client_status_is_not_over_while_finish_runs() -> None:
    """A failed run task turns ClientStatus failed before the finish task ran: not over yet."""
    running_finish = alloc("failed", **done(finish=task("running")))
    assert not state.alloc_over(running_finish)
    assert state.alloc_over(alloc("failed", **done()))
    assert state.alloc_over(alloc("lost", run=task("running")))


def test_the_run_is_over_when_the_run_task_is_dead_whatever_the_writer_does() -> None:
    """The service concludes once the run task is dead; it never waits for poststop."""
    assert state.run_over(alloc("running", **done(finish=task("running"))))
    assert not state.run_over(alloc("running", run=task("running"), finish=task("pending")))
    never = {"install": task("dead", exit_code="1"), "run": task("dead", started=ZERO)}
    assert state.run_over(alloc("failed", **never))


def test_run_started_only_once_the_run_task_runs() -> None:
    """The execution is running when the run task is, not during setup."""
    assert (
        state.run_started(
            alloc("running", setup=task("running"), run=task("pending", started=ZERO))
        )
        is None
    )
    started = state.run_started(alloc("running", run=task("running")))
    assert started is not None
    assert started.second == 5


def verdict_line(**fields: Any) -> bytes:
    """A ``verdict.json`` as the run task writes it."""
    return json.dumps(fields).encode()


def test_the_verdict_decides_when_present() -> None:
    """The run task's verdict gives the reason, exit code, error and timings."""
    verdict = state.parse_verdict(
        verdict_line(
            reason="timeout",
            exit_code=137,
            error="timed out after 2 s",
            started_at=STARTED,
            finished_at=FINISHED,
        )
    )
    outcome = state.outcome(alloc(**done()), verdict, "out", "err", False)
    assert (outcome.reason, outcome.exit_code, outcome.error) == (
        Reason.TIMEOUT,
        137,
        "timed out after 2 s",
    )
    assert (outcome.stdout, outcome.stderr) == ("out", "err")
    assert outcome.finished_at == datetime(2026, 1, 2, 3, 4, 7, 500000, tzinfo=UTC)


def test_setup_failure_keeps_the_error_and_the_output_the_task_left() -> None:
    """A setup failure reports its error, and the setup output the task left as stderr."""
    verdict = state.parse_verdict(verdict_line(reason="setup_failed", error="pip failed"))
    outcome = state.outcome(alloc(**done()), verdict, "", "No matching distribution", False)
    assert (outcome.reason, outcome.error, outcome.stderr) == (
        Reason.SETUP_FAILED,
        "pip failed",
        "No matching distribution",
    )


def test_a_skipped_run_is_an_error_not_a_verdict_of_its_own() -> None:
    """A run task that found its record terminal ran nothing: an error, never a success."""
    verdict = state.parse_verdict(verdict_line(reason="skipped", error="already killed"))
    assert verdict == {"reason": "error", "error": "already killed"}


def test_unreadable_verdict_is_ignored() -> None:
    """A verdict with an unknown reason, bad JSON, no object or too many bytes is none."""
    assert state.parse_verdict(verdict_line(reason="sideways")) is None
    assert state.parse_verdict(b"{not json") is None
    assert state.parse_verdict(b"[]") is None
    assert state.parse_verdict(b"") is None
    assert state.parse_verdict(None) is None
    padded = verdict_line(reason="exited", pad="x" * state.VERDICT_BYTES)
    assert state.parse_verdict(padded) is None


def test_a_stopped_job_is_killed_not_completed() -> None:
    """DesiredStatus=stop wins over a clean-looking exit: the run was killed."""
    stopped = alloc("complete", "stop", **done())
    verdict = {"reason": "exited", "exit_code": 0}
    assert state.outcome(stopped, verdict, "", "", False).reason is Reason.KILLED


def test_lost_allocation_is_a_failure() -> None:
    """A lost allocation (its node went away) is an error, not a completion."""
    lost = alloc("lost", "stop", run=task("dead"))  # Nomad also sets DesiredStatus=stop
    outcome = state.outcome(lost, None, "", "", False)
    assert outcome.reason is Reason.ERROR
    assert "lost" in (outcome.error or "")


def test_without_a_verdict_oom_comes_from_the_terminated_event() -> None:
    """With no verdict, oom_killed in the Terminated event means OOM."""
    tasks = done(run=task("dead", finished=FINISHED, exit_code="137", oom_killed="true"))
    outcome = state.outcome(alloc("failed", **tasks), None, "", "", False)
    assert (outcome.reason, outcome.exit_code) == (Reason.OOM, 137)


def test_without_a_verdict_a_run_that_ended_is_an_error_with_its_exit_code() -> None:
    """With no verdict, the run task died before it could write one: an error (never a
    completion), with the exit code Nomad saw."""
    tasks = done(run=task("dead", finished=FINISHED, exit_code="4"))
    outcome = state.outcome(alloc("failed", **tasks), None, "o", "e", True)
    assert (outcome.reason, outcome.exit_code, outcome.output_truncated) == (Reason.ERROR, 4, True)


def test_without_a_verdict_a_failed_installer_is_a_setup_failure() -> None:
    """With no verdict and a run task that never started after the installer failed."""
    tasks = {
        "install": task("dead", exit_code="1"),
        "run": task("dead", started=None),  # Nomad sends null for a task that never started
        "finish": task("dead", exit_code="0"),
    }
    outcome = state.outcome(alloc("failed", **tasks), None, "", "", False)
    assert outcome.reason is Reason.SETUP_FAILED
    assert "exit code 1" in (outcome.error or "")
    assert outcome.started_at is None


def test_without_a_verdict_a_crashed_setup_task_is_a_setup_failure() -> None:
    """A setup task (pre-commands with the network) that died, e.g. out of memory, before
    the run task started is setup_failed naming it; a setup task that exited 0 is not."""
    tasks = {
        "setup": task("dead", exit_code="137"),
        "run": task("dead", started=None),
        "finish": task("dead", exit_code="0"),
    }
    outcome = state.outcome(alloc("failed", **tasks), None, "", "", False)
    assert outcome.reason is Reason.SETUP_FAILED
    assert outcome.error == "the setup task failed (exit code 137)"
    tasks["setup"] = task("dead", exit_code="0")
    outcome = state.outcome(alloc("failed", **tasks), None, "", "", False)
    assert outcome.reason is Reason.ERROR


def test_a_run_task_that_never_started_without_installer_is_an_error() -> None:
    """A run task that never started (e.g. its image could not be pulled) is an error."""
    outcome = state.outcome(alloc("failed", run=task("dead", started=ZERO)), None, "", "", False)
    assert outcome.reason is Reason.ERROR


def test_placement_failure_says_which_dimension_is_exhausted() -> None:
    """FailedTGAllocs becomes one sentence naming the group and the exhausted resource."""
    evaluation = {
        "Status": "complete",
        "BlockedEval": "b1",
        "FailedTGAllocs": {
            "pyexec": {
                "NodesEvaluated": 3,
                "NodesExhausted": 3,
                "DimensionExhausted": {"memory": 3},
                "ConstraintFiltered": {"${node.class} = gpu": 2},
            }
        },
    }
    message = state.placement_failure(evaluation)
    assert message is not None
    assert "group 'pyexec': 3 nodes evaluated" in message
    assert "not enough memory (3 nodes)" in message
    assert "filtered by constraint" in message
    assert state.placement_failure({"Status": "complete", "FailedTGAllocs": None}) is None
