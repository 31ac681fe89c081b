"""Both client twins against a real server on the embedded default (local Docker)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from pyexec.client import (
    AsyncClient,
    Client,
    NotFoundError,
    Reason,
    RunOptions,
    Status,
    tar_from_mapping,
)

from .conftest import LiveServer, live_server, make_settings

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(make_settings()) as live:
        yield live


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest, server: LiveServer) -> Any:
    """Run ``fn(client)`` with a sync client, or ``await fn(client)`` with an async one."""

    def invoke(fn: Any) -> Any:
        if request.param == "sync":
            with Client(server.url) as client:
                return fn(client)

        async def go() -> Any:
            async with AsyncClient(server.url) as client:
                return await fn(client)

        return asyncio.run(go())

    return invoke


def test_run_project(call: Any) -> None:
    """run executes a multi-file tar and returns output, exit code and timings."""
    tar = tar_from_mapping(
        {"main.py": "import sys, lib\nprint(lib.X)\nsys.exit(3)\n", "lib.py": "X = 'lib'\n"}
    )
    result = call(lambda c: c.run(tar, RunOptions(timeout=30)))
    assert (result.status, result.reason, result.exit_code) == (Status.COMPLETED, Reason.EXITED, 3)
    assert result.stdout == "lib\n"
    assert result.duration_ms is not None


def test_submit_wait_logs(call: Any) -> None:
    """submit returns at once; wait returns the terminal record; logs has the output."""

    async def flow_async(c: AsyncClient) -> Any:
        submitted = await c.submit({"main.py": "print('later')"})
        return await c.wait(submitted.execution_id, timeout=120), await c.logs(
            submitted.execution_id
        )

    def flow(c: Any) -> Any:
        if isinstance(c, AsyncClient):
            return flow_async(c)
        submitted = c.submit({"main.py": "print('later')"})
        return c.wait(submitted.execution_id, timeout=120), c.logs(submitted.execution_id)

    record, logs = call(flow)
    assert record.status is Status.COMPLETED
    assert (logs.stdout, logs.terminal) == ("later\n", True)


def test_kill_and_not_found(call: Any) -> None:
    """kill stops a sleeper (twice is fine); an unknown id raises NotFoundError."""

    async def flow_async(c: AsyncClient) -> Any:
        submitted = await c.submit({"main.py": "import time\ntime.sleep(60)"})
        first = await c.kill(submitted.execution_id)
        return first, await c.kill(submitted.execution_id)

    def flow(c: Any) -> Any:
        if isinstance(c, AsyncClient):
            return flow_async(c)
        submitted = c.submit({"main.py": "import time\ntime.sleep(60)"})
        return c.kill(submitted.execution_id), c.kill(submitted.execution_id)

    first, second = call(flow)
    assert first.status is Status.KILLED
    assert second.status is Status.KILLED
    with pytest.raises(NotFoundError):
        call(lambda c: c.get("exe_00000000-0000-4000-8000-000000000000"))


def test_eval(call: Any) -> None:
    """eval returns the last expression's value."""
    result = call(lambda c: c.eval("x = 6\nx * 7", last_expr=True))
    assert result.status is Status.COMPLETED
    assert result.result == "42"
