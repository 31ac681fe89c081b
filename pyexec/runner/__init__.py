"""The runner seam: launch, wait, read output, kill.

One module per backend: ``docker`` (local Docker, the embedded default) and
``nomad`` (a parameterized Nomad batch job). ``pyexec.api.app`` picks one from
``Settings``; the execution service only sees this interface.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Protocol

from pyexec.models import Execution, ExecutionRequest, RunOutcome

__all__ = ["OnOutput", "OnRunning", "Runner"]

#: Called once when the sandboxed process starts, with the time it started.
OnRunning = Callable[[datetime], Awaitable[None]]
#: Called with each piece of the program's output as it is produced: the stream
#: (``"stdout"`` or ``"stderr"``) and its raw bytes, in order, already within the output
#: cap. Synchronous and quick (it only queues): a runner calls it from its event loop and
#: never waits for whoever reads the output.
OnOutput = Callable[[str, bytes], None]


class Runner(Protocol):
    @property
    def survives_restart(self) -> bool:
        """Whether a run outlives the service process (Nomad: yes; local Docker: no, so a
        shutting-down service kills and records its runs)."""

    @property
    def reads_stored_tar(self) -> bool:
        """Whether the run fetches its tar from the store itself (Nomad: the task reads
        Consul). If not (local Docker), the store never holds the tar: ``start`` gets it
        as a stream straight from the upload."""

    @property
    def launch_allowance(self) -> float:
        """Seconds this runner may need before a launched run starts, on top of the run's
        own budget (``pyexec.deadline``): Nomad's placement timeout; 0 for local Docker."""

    def check(self, request: ExecutionRequest) -> None:
        """Called at submit, before anything is stored: raise a ``BadRequest`` (with a
        stable ``code``) for anything in ``request`` this runner cannot honour. Never
        drops or downgrades a part of the request silently."""

    async def startup(self) -> None:
        """Prepare the backend once at service start (sweep leftovers, register jobs)."""

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        *,
        on_output: OnOutput | None = None,
    ) -> None:
        """Launch the run and return once it is launched (not finished).

        ``tar`` streams the archive (a backend that ``reads_stored_tar`` need not read
        it). ``on_output`` gets the output while the run runs (live output); the outcome
        still carries all of it. Raises ``BackendError``/``BackendUnavailable`` if it
        cannot launch; anything it created on the way is released before it raises.
        """

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        """The outcome of a launched run; ``TimeoutError`` after ``timeout`` seconds.

        The run's own timeout is enforced by the runner (``Reason.TIMEOUT``); ``timeout``
        here is the caller's outer bound.
        """

    async def logs(self, execution_id: str) -> tuple[str, str]:
        """Output so far (stdout, stderr), capped like the final output; empty if unknown."""

    async def kill(self, execution_id: str) -> None:
        """Stop the run and release its resources. Killing what is gone succeeds."""

    async def resume(self, execution: Execution, *, on_output: OnOutput | None = None) -> bool:
        """After a service restart: keep watching ``execution`` if this runner can
        (``wait`` then works for it); ``False`` if the run is lost. ``on_output`` as for
        ``start``, from the beginning of the output (a runner that cannot follow an
        adopted run's output leaves it to the outcome)."""

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` if the backend cannot be reached."""

    async def aclose(self) -> None:
        """Stop watchers and release connections; idempotent."""
