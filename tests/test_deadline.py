"""One deadline rule: the service, the runners and the client all ask ``pyexec.deadline``."""

from __future__ import annotations

import ast
import asyncio
import io
import pathlib

import pytest

from pyexec import deadline
from pyexec.client._base import READ_MARGIN, run_wait
from pyexec.client.models import RunOptions
from pyexec.execution_service import ExecutionService
from pyexec.models import Execution, ExecutionRequest, RunOutcome, parse_request
from pyexec.store.memory import MemoryStore

from .conftest import make_settings
from .fakes import FakeRunner
from .tarfiles import make_tar

pytestmark = pytest.mark.anyio

PACKAGE = pathlib.Path(deadline.__file__).parent


def test_setup_doubles_the_run_time_and_allowance_adds() -> None:
    """A setup phase gets as much time again as the run; a runner's allowance adds on top."""
    settings = make_settings()
    plain = parse_request({"config": {"timeout_seconds": 10}}, settings)
    setup = parse_request({"config": {"timeout_seconds": 10}, "pre_commands": ["true"]}, settings)
    slack = deadline.SLACK_SECONDS
    assert deadline.execution_budget(plain) == 10 + slack
    assert deadline.execution_budget(setup) == 20 + slack
    assert deadline.execution_budget(plain, allowance=7) == 17 + slack


def test_the_client_waits_the_servers_budget_plus_its_margin() -> None:
    """``run_wait`` is the server's budget for the same options plus the client's margin."""
    request = parse_request({"config": {"timeout_seconds": 60}}, make_settings(max_timeout=600))
    assert run_wait(RunOptions(timeout=60)) == deadline.execution_budget(request) + READ_MARGIN


def test_deadline_imports_nothing_at_run_time() -> None:
    """The client imports ``pyexec.deadline``, so it pulls in no server dependency."""
    tree = ast.parse(pathlib.Path(deadline.__file__).read_text())
    runtime_imports = [
        node
        for node in tree.body
        if isinstance(node, ast.Import | ast.ImportFrom)
        and not (isinstance(node, ast.ImportFrom) and node.module in {"__future__", "typing"})
    ]
    assert runtime_imports == []


class ResumingRunner(FakeRunner):
    """A fake whose runs survive a restart and that records every ``wait`` budget."""

    survives_restart = True

    def __init__(self) -> None:
        super().__init__()
        self.budgets: list[float] = []
        self.waiting = asyncio.Event()

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        self.budgets.append(timeout)
        self.waiting.set()
        return await super().wait(execution_id, timeout)

    async def resume(self, execution: Execution, *, on_output: object = None) -> bool:
        self._done[execution.execution_id] = asyncio.get_running_loop().create_future()
        return True


@pytest.mark.parametrize(
    "metadata",
    [
        {"stdin": "hold", "config": {"timeout_seconds": 5}},
        {"stdin": "hold", "requirements_txt": " \n ", "config": {"timeout_seconds": 5}},
        {"stdin": "hold", "pre_commands": ["true"], "config": {"timeout_seconds": 5}},
    ],
)
async def test_a_runs_deadline_is_the_same_after_a_restart(metadata: dict[str, object]) -> None:
    """A replica adopting a run after a restart waits exactly the budget the first one did."""
    settings = make_settings()
    store = MemoryStore()
    first, second = ResumingRunner(), ResumingRunner()
    request = parse_request(metadata, settings)
    before = ExecutionService(settings, store, first)
    record = await before.submit(request, io.BytesIO(make_tar({"main.py": "print(1)\n"})))
    await asyncio.wait_for(first.waiting.wait(), 5)
    await before.shutdown()
    after = ExecutionService(settings, store, second)
    await after.startup()
    try:
        await asyncio.wait_for(second.waiting.wait(), 5)
        assert second.budgets == first.budgets
        assert (await store.get(record.execution_id)).request == request
    finally:
        await after.shutdown()
        await store.aclose()


def test_a_stored_request_round_trips() -> None:
    """``ExecutionRequest.from_dict(to_dict())`` gives back the same request."""
    request = parse_request(
        {
            "entrypoint": "app/run.py",
            "requirements_txt": "attrs\n",
            "pre_commands": ["echo hi"],
            "stdin": "in",
            "env_vars": ["A=1", "B=x=y"],
            "script_args": ["--flag"],
            "config": {"timeout_seconds": 9, "memory_mb": 64},
        },
        make_settings(setup_network=True),  # requirements need the setup network
    )
    assert ExecutionRequest.from_dict(request.to_dict()) == request
    record = Execution(execution_id="exe_00000000-0000-0000-0000-000000000000", request=request)
    assert Execution.from_dict(record.to_dict(include_request=True)) == record


def test_a_record_stored_before_requests_had_a_version_still_loads() -> None:
    """A version-1 request (no ``version`` field) loads into the typed request."""
    request = parse_request({"pre_commands": ["true"]}, make_settings())
    old = request.to_dict()
    del old["version"]
    assert ExecutionRequest.from_dict(old) == request


def test_a_request_from_a_newer_server_is_refused_clearly() -> None:
    """A request layout newer than this server knows is a store error naming the version."""
    from pyexec.errors import BackendError

    data = parse_request({}, make_settings()).to_dict() | {"version": 99}
    with pytest.raises(BackendError, match="version 99"):
        ExecutionRequest.from_dict(data)
