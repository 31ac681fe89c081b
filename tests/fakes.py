"""A runner that runs nothing: for API tests that pin HTTP behaviour, not sandboxing.

It implements the real ``Runner`` seam; each run's outcome comes from a function of
the request, and a run with ``hold`` in its stdin blocks until killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Collection

from pyexec.errors import BackendUnavailable
from pyexec.models import Execution, ExecutionRequest, Reason, RunOutcome, Status, utcnow
from pyexec.runner import OnOutput, OnRunning
from pyexec.store import Store


def echo_outcome(request: ExecutionRequest) -> RunOutcome:
    return RunOutcome(reason=Reason.EXITED, exit_code=0, stdout=request.stdin)


class FakeRunner:
    survives_restart = False
    launch_allowance = 0.0
    reads_stored_tar = False

    def __init__(self, outcome: Callable[[ExecutionRequest], RunOutcome] = echo_outcome) -> None:
        self.outcome = outcome
        self.started: list[str] = []
        self.killed: list[str] = []
        self.tars: dict[str, bytes] = {}
        self.fail_start: BackendUnavailable | None = None
        self._done: dict[str, asyncio.Future[RunOutcome]] = {}
        self._running: dict[str, asyncio.Event] = {}
        self._requests: dict[str, ExecutionRequest] = {}
        #: Ids in the order their runs started (``await launches.get()`` to follow them).
        self.launches: asyncio.Queue[str] = asyncio.Queue()
        #: The live output callback of each run (``emit`` calls it).
        self.outputs: dict[str, OnOutput] = {}

    async def startup(self) -> None:
        return None

    def check(self, request: ExecutionRequest) -> None:
        return None

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        *,
        on_output: OnOutput | None = None,
    ) -> None:
        if self.fail_start is not None:
            raise self.fail_start
        if on_output is not None:
            self.outputs[execution.execution_id] = on_output
        self.tars[execution.execution_id] = b"".join([chunk async for chunk in tar])
        self.started.append(execution.execution_id)
        future: asyncio.Future[RunOutcome] = asyncio.get_running_loop().create_future()
        self._done[execution.execution_id] = future
        await on_running(utcnow())
        self._running.setdefault(execution.execution_id, asyncio.Event()).set()
        self._requests[execution.execution_id] = request
        self.launches.put_nowait(execution.execution_id)
        if "hold" not in request.stdin:
            future.set_result(self.outcome(request))

    def emit(self, execution_id: str, stream: str, data: bytes) -> None:
        """Produce output of a held run, as a runner does while the program prints."""
        self.outputs[execution_id](stream, data)

    def finish(self, execution_id: str) -> None:
        """End a held run (``hold`` in its stdin) as if it exited by itself."""
        self._done[execution_id].set_result(self.outcome(self._requests[execution_id]))

    async def wait_running(self, execution_id: str, timeout: float = 10) -> None:
        """Return once the run of ``execution_id`` was launched and reported running
        (an async submit answers before that)."""
        event = self._running.setdefault(execution_id, asyncio.Event())
        await asyncio.wait_for(event.wait(), timeout)

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        return await asyncio.wait_for(asyncio.shield(self._done[execution_id]), timeout)

    async def logs(self, execution_id: str) -> tuple[str, str]:
        return ("partial", "")

    async def kill(self, execution_id: str) -> None:
        self.killed.append(execution_id)
        future = self._done.get(execution_id)
        if future is not None and not future.done():
            future.set_result(RunOutcome(reason=Reason.KILLED, exit_code=137, stdout="so far"))

    async def resume(self, execution: Execution, *, on_output: OnOutput | None = None) -> bool:
        return False

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def replace_record(
    store: Store, record: Execution, *, expect: Collection[Status]
) -> Execution:
    """Make ``record`` the stored state through ``Store.transition`` (a change that ignores
    what is stored, for tests that set a state directly)."""
    return await store.transition(record.execution_id, lambda _: record, expect=expect)
