"""Reading a dispatched run's state out of Nomad's allocation and evaluation JSON.

Pure functions, so the mapping from Nomad's vocabulary to pyexec's verdicts is
tested without an agent:

- the ``run`` task's ``StartedAt`` is when the sandboxed process started;
- an allocation is over when every task is dead (or Nomad lost it);
- ``DesiredStatus=stop`` means it was stopped: killed, not completed;
- ``ClientStatus=lost`` means the node went away: a failure;
- the run task writes its verdict (``verdict.json``) into the allocation
  directory; without one, the ``run`` task's ``Terminated`` event gives the
  exit code and ``oom_killed``;
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
    "run_over",
    "run_started",
    "terminated_event",
]

JSON = Mapping[str, Any]
RUN_TASK = "run"
INSTALL_TASK = "install"
SETUP_TASK = "setup"
#: Where the run task leaves its results (stdout, stderr, verdict.json), relative to
#: the allocation directory.
RESULTS_DIR = "alloc/data/pyexec"
VERDICT_FILE = "verdict.json"
#: The run task's artifacts (a tar), written before the verdict when the request asks.
ARTIFACTS_FILE = "artifacts.tar"
VERDICT_BYTES = 64 * 1024
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


def run_over(alloc: JSON) -> bool:
    """Whether the ``run`` task is done (its results are final), whatever the poststop
    writer still does; also when it never ran and never will (all tasks dead, lost)."""
    return _task(alloc, RUN_TASK).get("State") == "dead" or alloc_over(alloc)


def terminated_event(alloc: JSON, task: str = RUN_TASK) -> JSON | None:
    """Details of the task's last ``Terminated`` event."""
    for event in reversed(_task(alloc, task).get("Events") or []):
        if event.get("Type") == "Terminated":
            details: JSON = event.get("Details") or {}
            return details
    return None


def parse_verdict(raw: bytes | None) -> dict[str, Any] | None:
    """The run task's ``verdict.json``, checked (the program could have rewritten it);
    ``None`` if there is none or it is not one."""
    if raw is None or len(raw) > VERDICT_BYTES:
        return None
    try:
        verdict = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(verdict, dict):
        return None
    if verdict.get("reason") == "skipped":
        return {"reason": Reason.ERROR.value, "error": str(verdict.get("error") or "skipped")}
    if verdict.get("reason") not in Reason.__members__.values():
        return None
    return verdict


def _exit_code(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def outcome(
    alloc: JSON,
    verdict: Mapping[str, Any] | None,
    stdout: str,
    stderr: str,
    truncated: bool,
) -> RunOutcome:
    """The outcome of an allocation whose run task is over."""
    started = run_started(alloc)
    finished = parse_time(_task(alloc, RUN_TASK).get("FinishedAt"))

    def seen(reason: Reason, error: str | None, exit_code: int | None = None) -> RunOutcome:
        """What Nomad itself shows, with the output the task left."""
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
        error = verdict.get("error")
        return RunOutcome(
            reason=reason,
            exit_code=_exit_code(verdict.get("exit_code")),
            stdout=stdout,
            stderr=stderr,
            output_truncated=verdict.get("output_truncated") is True or truncated,
            started_at=parse_time(_str(verdict.get("started_at"))) or started,
            finished_at=parse_time(_str(verdict.get("finished_at"))) or finished,
            error=str(error) if error else None,
            # Written by the run task, so the program could rewrite it: a known value only.
            deps_cache=_one_of(verdict.get("deps_cache"), ("hit", "miss", "off")),
        )
    # No verdict: the run task never got to write one. Tell what Nomad itself saw.
    if started is None:
        for name in (INSTALL_TASK, SETUP_TASK):
            ended = terminated_event(alloc, name) or {}
            if ended and str(ended.get("exit_code", "0")) != "0":
                return seen(
                    Reason.SETUP_FAILED,
                    f"the {name} task failed (exit code {ended.get('exit_code', '?')})",
                )
        return seen(Reason.ERROR, "the run task never started")
    details = terminated_event(alloc) or {}
    exit_code = _exit_code(details.get("exit_code"))
    if str(details.get("oom_killed", "")).lower() == "true":
        return seen(Reason.OOM, "out of memory", exit_code)
    return seen(Reason.ERROR, "the run task ended without a verdict", exit_code)


def _one_of(value: Any, allowed: tuple[str, ...]) -> str | None:
    return value if value in allowed else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


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
