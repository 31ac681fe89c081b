"""How the end of a sandbox container becomes the execution's verdict (a pure function).

Several things can be true at once when a container is gone: the runner stopped it
for a limit, a kill came, the engine saw it run out of memory, the bootstrap's
control line said how far it got, its trailer how the program ended. ``verdict``
decides, in this order: a limit the runner enforced, a kill, the setup's own
failure, memory, the sandbox's own deadline, a sandbox killed from outside (memory),
a sandbox that never started its program, and otherwise the program's own exit. Anything that ends a
container before its setup is over is a failed setup, as the program never ran.
"""

from __future__ import annotations

import attrs

from pyexec.models import Reason
from pyexec.runner.docker_spec import Phase

__all__ = ["Ending", "verdict"]

_SETUP_OVER = frozenset({"ready", "setup_ok"})


@attrs.frozen(kw_only=True)
class Ending:
    """What is known once a container has exited."""

    phase: Phase
    #: The control line's status (``None``: the bootstrap never wrote one) and message.
    status: str | None
    message: str = ""
    exited: int | None
    #: A limit the runner enforced (timeout, output_limit), with its error.
    limit: Reason | None = None
    limit_error: str | None = None
    killed: bool = False
    oom: bool = False
    memory_mb: int = 0
    #: How the bootstrap's trailer says the program ended (``exit``, ``timeout``,
    #: ``stopped``), or ``None``: it never said (a sandbox killed from outside, or no
    #: program ran).
    ended: str | None = None
    timeout_seconds: int = 0


def verdict(ending: Ending) -> tuple[Reason, str | None] | None:
    """The reason and error the execution ends with, or ``None`` when a setup-only
    container succeeded (the run container comes next)."""
    status = ending.status
    in_setup = ending.phase.setup and status not in _SETUP_OVER
    memory = f"more than {ending.memory_mb} MiB of memory"
    if ending.limit is not None:
        return (Reason.SETUP_FAILED if in_setup else ending.limit), ending.limit_error
    if ending.killed:
        return Reason.KILLED, None
    if status == "setup_failed":
        error = ending.message or "setup failed"
        return Reason.SETUP_FAILED, f"{error} (killed for using {memory})" if ending.oom else error
    if ending.oom:
        if in_setup:
            return Reason.SETUP_FAILED, f"setup killed for using {memory}"
        return Reason.OOM, f"killed for using {memory}"
    if in_setup and status is None and ending.exited == 137:
        # SIGKILL of the whole sandbox during setup (see below).
        return Reason.SETUP_FAILED, f"setup was killed, most likely for using {memory}"
    if ending.phase.run and status == "ready":
        if ending.ended == "stopped":
            return (
                Reason.ERROR,
                "the sandbox was stopped from outside (the Docker engine shut down?)",
            )
        if ending.ended == "timeout":
            # The sandbox's own deadline acted before the runner's (or without it).
            return Reason.TIMEOUT, f"the run exceeded its timeout of {ending.timeout_seconds}s"
        if ending.ended is None and ending.exited == 137:
            # SIGKILL from outside took the bootstrap too: nobody but the kernel's OOM
            # killer does that to a run the runner did not stop (under gVisor the engine
            # does not always notice it as such).
            return Reason.OOM, f"the sandbox was killed, most likely for using {memory}"
    if status == "error" or status is None:
        detail = ending.message or f"exit {ending.exited} before the program ran"
        return Reason.ERROR, f"the sandbox could not start: {detail}"
    if status == "setup_ok" and not ending.phase.run:
        return None
    return Reason.EXITED, None
