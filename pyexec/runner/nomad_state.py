"""Reading a dispatched run's state out of Nomad's allocation and evaluation JSON.

Pure functions, so the mapping from Nomad's vocabulary to pyexec's verdicts is
tested without an agent:

- the ``run`` task's ``StartedAt`` is when the sandboxed process started;
- an allocation is over when every task is dead (or Nomad lost it);
- ``DesiredStatus=stop`` means it was stopped: killed, not completed;
- ``ClientStatus=lost`` means the node went away: a failure;
- the finish task prints a verdict line; without one, the ``run`` task's
  ``Terminated`` event gives the exit code and ``oom_killed``;
- a blocked evaluation's ``FailedTGAllocs`` says why nothing could be placed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pyexec.models import Reason, RunOutcome

__all__ = [
    "alloc_over",
    "outcome",
    "parse_time",
    "parse_verdict",
    "placement_failure",
    "run_started",
    "terminated_event",
]

JSON = Mapping[str, Any]
RUN_TASK = "run"
SETUP_TASK = "setup"
VERDICT_PREFIX = "pyexec-verdict "
_FRACTION = re.compile(r"\.(\d+)")


def parse_time(value: str | None) -> datetime | None:
    """Nomad's RFC 3339 times (nanoseconds, Go's zero time for "never") as datetimes."""
    if not value or value.startswith("0001-01-01"):
        return None
    value = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), value, count=1)
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.astimezone(UTC)


def _task(alloc: JSON, name: str) -> JSON:
    states: JSON = alloc.get("TaskStates") or {}
    task: JSON = states.get(name) or {}
    return task


def run_started(alloc: JSON) -> datetime | None:
    """When the ``run`` task started, if it has."""
    task = _task(alloc, RUN_TASK)
    if task.get("State") not in {"running", "dead"}:
        return None
    return parse_time(task.get("StartedAt"))


def alloc_over(alloc: JSON) -> bool:
    """Whether nothing of the allocation runs any more, the finish task included.

    ``ClientStatus`` alone will not do: it turns ``failed`` as soon as the run task
    fails, while the finish task is still to run.
    """
    if alloc.get("ClientStatus") == "lost":
        return True
    states: JSON = alloc.get("TaskStates") or {}
    return bool(states) and all(s.get("State") == "dead" for s in states.values())


def terminated_event(alloc: JSON, task: str = RUN_TASK) -> JSON | None:
    """Details of the task's last ``Terminated`` event."""
    for event in reversed(_task(alloc, task).get("Events") or []):
        if event.get("Type") == "Terminated":
            details: JSON = event.get("Details") or {}
            return details
    return None


def parse_verdict(finish_stdout: bytes) -> dict[str, Any] | None:
    """The finish task's verdict line, checked; ``None`` if it printed none."""
    for line in reversed(finish_stdout.decode("utf-8", "replace").splitlines()):
        if line.startswith(VERDICT_PREFIX):
            try:
                verdict = json.loads(line[len(VERDICT_PREFIX) :])
            except ValueError:
                return None
            if isinstance(verdict, dict) and verdict.get("reason") in Reason.__members__.values():
                return verdict
            return None
    return None


def outcome(
    alloc: JSON,
    verdict: Mapping[str, Any] | None,
    stdout: str,
    stderr: str,
    truncated: bool,
) -> RunOutcome:
    """The outcome of an allocation that is over."""
    started = run_started(alloc)
    run_task = _task(alloc, RUN_TASK)
    finished = parse_time(run_task.get("FinishedAt"))

    def seen(reason: Reason, error: str | None, exit_code: int | None = None) -> RunOutcome:
        """What Nomad itself shows, with the output read from its logs."""
        return RunOutcome(
            reason=reason,
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            output_truncated=truncated,
            started_at=started,
            finished_at=finished,
            error=error,
        )

    # A lost allocation is also marked DesiredStatus=stop: look at lost first.
    if alloc.get("ClientStatus") == "lost":
        return seen(Reason.ERROR, "the allocation was lost (its node went away)")
    if alloc.get("DesiredStatus") == "stop":
        return seen(Reason.KILLED, "stopped")
    if verdict is not None:
        reason = Reason(verdict["reason"])
        exit_code = verdict.get("exit_code")
        if reason is Reason.SETUP_FAILED and verdict.get("stderr"):
            stderr = str(verdict["stderr"])
        return RunOutcome(
            reason=reason,
            exit_code=exit_code if isinstance(exit_code, int) else None,
            stdout=stdout,
            stderr=stderr,
            output_truncated=bool(verdict.get("output_truncated")) or truncated,
            started_at=parse_time(verdict.get("started_at")) or started,
            finished_at=parse_time(verdict.get("finished_at")) or finished,
            error=verdict.get("error"),
        )
    # No verdict: the finish task failed. Tell what Nomad itself saw.
    if started is None:
        setup = terminated_event(alloc, SETUP_TASK) or {}
        return RunOutcome(
            reason=Reason.SETUP_FAILED,
            stdout=stdout,
            stderr=stderr,
            error=f"the setup task failed (exit code {setup.get('exit_code', '?')})",
        )
    details = terminated_event(alloc) or {}
    code = details.get("exit_code")
    exit_code = (
        int(code) if isinstance(code, (int, str)) and str(code).lstrip("-").isdigit() else None
    )
    if str(details.get("oom_killed", "")).lower() == "true":
        return seen(Reason.OOM, "out of memory", exit_code)
    if exit_code is None:
        return seen(Reason.ERROR, "the run task left no exit code")
    return seen(Reason.EXITED, None, exit_code)


def placement_failure(evaluation: JSON) -> str | None:
    """Why an evaluation could not place the group, in a sentence; ``None`` if it did."""
    failed: JSON = evaluation.get("FailedTGAllocs") or {}
    if not failed:
        return None
    parts = []
    for group, metric in failed.items():
        evaluated = int(metric.get("NodesEvaluated") or 0)
        bits = []
        if not evaluated and not metric.get("NodesAvailable"):
            bits.append("no client node in the job's datacenters/node pool")
        exhausted: JSON = metric.get("DimensionExhausted") or {}
        if exhausted:
            bits.append(
                "not enough " + ", ".join(f"{k} ({v} nodes)" for k, v in sorted(exhausted.items()))
            )
        for key, what in (("ConstraintFiltered", "constraint"), ("ClassFiltered", "class")):
            filtered: JSON = metric.get(key) or {}
            if filtered:
                bits.append(
                    f"filtered by {what}: "
                    + ", ".join(f"{k} ({v} nodes)" for k, v in sorted(filtered.items()))
                )
        if metric.get("CoalescedFailures"):
            bits.append(f"{metric['CoalescedFailures']} more failures coalesced")
        detail = "; ".join(bits) or "resources exhausted"
        parts.append(f"group {group!r}: {evaluated} nodes evaluated, {detail}")
    return "cannot be placed yet: " + " | ".join(parts)
