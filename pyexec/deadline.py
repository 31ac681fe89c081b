"""How long an execution may take before whoever waits for it gives up: one rule.

The service waits this long for its runner, the Nomad runner stops a placed run
that overstays it, and the client library waits this long (plus its own network
margin) for a sync answer. They all ask ``execution_budget`` (or, with no request
object at hand, ``budget_seconds``), so a change here moves every one of them.

Stdlib only at run time: the client package imports this module and must not pull
in the server's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyexec.models import ExecutionRequest

__all__ = ["SLACK_SECONDS", "budget_seconds", "execution_budget"]

#: Slack on top of a run's own time (container start, collecting output, storing it).
SLACK_SECONDS = 30.0


def budget_seconds(timeout_seconds: float, *, setup: bool, allowance: float = 0.0) -> float:
    """The run's limit, as much again for a setup phase, the slack, and ``allowance``
    (what the runner needs before the run can start, e.g. Nomad placement)."""
    run = float(timeout_seconds)
    return run + (run if setup else 0.0) + SLACK_SECONDS + allowance


def execution_budget(request: ExecutionRequest, *, allowance: float = 0.0) -> float:
    """Seconds the service waits for a runner to report ``request``'s outcome."""
    return budget_seconds(
        request.config.timeout_seconds, setup=request.needs_setup, allowance=allowance
    )
