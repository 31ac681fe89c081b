"""The MCP tool server, driven by the MCP SDK's own client over stdio and streamable HTTP.

The docker tests run real code (so `result`, `error_type` and `error_line` are the real
thing); the others pin the HTTP mount's auth and argument handling with a fake runner.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from pyexec.store.memory import MemoryStore

from .conftest import LiveServer, live_server, make_settings
from .fakes import FakeRunner

PYEXEC = str(Path(sys.executable).with_name("pyexec"))
TOOLS = {"run_python", "run_python_async", "get_execution", "kill_execution"}
TOKEN = "mcp-test-token"


@asynccontextmanager
async def http_session(
    server: LiveServer, token: str | None, statuses: list[int] | None = None
) -> AsyncIterator[Client]:
    """An MCP client session on ``/mcp``; ``statuses`` collects the HTTP answers' codes."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def seen(response: httpx2.Response) -> None:
        if statuses is not None:
            statuses.append(response.status_code)

    async with (
        httpx2.AsyncClient(headers=headers, timeout=120, event_hooks={"response": [seen]}) as http,
        Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as client,
    ):
        yield client


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return dict(result.structured_content)


@pytest.fixture(scope="module")
def real_server() -> Iterator[LiveServer]:
    with live_server(make_settings(api_tokens=(TOKEN,))) as live:
        yield live


@pytest.fixture(scope="module")
def fake_server() -> Iterator[LiveServer]:
    settings = make_settings(api_tokens=(TOKEN,))
    with live_server(settings, store=MemoryStore(), runner=FakeRunner()) as live:
        yield live


@pytest.mark.docker
@pytest.mark.anyio
async def test_stdio_session(real_server: LiveServer) -> None:
    """`pyexec mcp` over stdio lists the tools and runs code: value, output, error type and line."""
    params = StdioServerParameters(
        command=PYEXEC, args=["--server", real_server.url, "--token", TOKEN, "mcp"]
    )
    async with Client(params) as client:
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} == TOOLS
        done = structured(
            await client.call_tool("run_python", {"code": "print('hi')\nx = 5\nx * 2"})
        )
        assert (done["status"], done["verdict"], done["exit_code"]) == ("completed", "exited", 0)
        assert (done["stdout"], done["result"]) == ("hi\n", "10")
        failed = structured(await client.call_tool("run_python", {"code": "x = 1\n1 / 0\n"}))
        assert (failed["exit_code"], failed["error_type"], failed["error_line"]) == (
            1,
            "ZeroDivisionError",
            2,
        )
        assert "Traceback" in failed["stderr"]


@pytest.mark.docker
@pytest.mark.anyio
async def test_http_session(real_server: LiveServer) -> None:
    """/mcp with a token: run_python, then run_python_async + get_execution, and kill."""
    async with http_session(real_server, TOKEN) as client:
        tools = await client.list_tools()
        assert {tool.name for tool in tools.tools} == TOOLS
        done = structured(
            await client.call_tool(
                "run_python",
                {
                    "files": {
                        "main.py": "import util\nutil.twice(int(input()))",
                        "util.py": "def twice(x):\n    return 2 * x\n",
                    },
                    "stdin": "21\n",
                },
            )
        )
        assert (done["verdict"], done["result"]) == ("exited", "42")

        started = structured(await client.call_tool("run_python_async", {"code": "6 * 7"}))
        read = structured(
            await client.call_tool(
                "get_execution", {"execution_id": started["execution_id"], "wait_seconds": 60}
            )
        )
        assert (read["status"], read["result"]) == ("completed", "42")

        sleeper = structured(
            await client.call_tool("run_python_async", {"code": "import time\ntime.sleep(600)"})
        )
        killed = structured(
            await client.call_tool("kill_execution", {"execution_id": sleeper["execution_id"]})
        )
        assert killed["status"] == "killed"


def test_http_without_token_is_401(fake_server: LiveServer) -> None:
    """With tokens configured, /mcp without one (or with a wrong one) answers 401."""
    initialize = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json, text/event-stream"}
    for auth in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(
            f"{fake_server.url}/mcp", json=initialize, headers=headers | auth, timeout=30
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.anyio
async def test_http_client_without_token_fails(fake_server: LiveServer) -> None:
    """The SDK client cannot open a session on /mcp without the token: the server says 401."""
    statuses: list[int] = []
    # The SDK reports the refusal as a generic error (inside a task group): the status
    # codes it met say why.
    with pytest.raises(Exception):  # noqa: PT011, B017
        async with http_session(fake_server, None, statuses) as client:
            await client.list_tools()
    assert statuses
    assert set(statuses) == {401}


@pytest.mark.anyio
async def test_tool_errors_read_as_messages(fake_server: LiveServer) -> None:
    """Bad arguments and unknown ids come back as tool errors with a message, not crashes."""
    async with http_session(fake_server, TOKEN) as client:
        both = await client.call_tool("run_python", {"code": "1", "files": {"a.py": ""}})
        assert both.is_error
        assert "either `code`" in both.content[0].text  # type: ignore[union-attr]
        bad_version = await client.call_tool("run_python", {"code": "1", "python_version": "2.7"})
        assert bad_version.is_error
        assert "unsupported_python_version" in bad_version.content[0].text  # type: ignore[union-attr]
        missing = await client.call_tool("get_execution", {"execution_id": "exe_" + "0" * 26})
        assert missing.is_error
        assert "execution_not_found" in missing.content[0].text  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_tool_schema_describes_the_sandbox(fake_server: LiveServer) -> None:
    """run_python tells a model about the sandbox and advertises its result's schema."""
    async with http_session(fake_server, TOKEN) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    run = tools["run_python"]
    assert "NO network" in (run.description or "")
    assert "error_type" in (run.description or "")
    wanted = {"code", "files", "entrypoint", "stdin", "args", "requirements", "timeout_seconds"}
    assert set(run.input_schema["properties"]) >= wanted
    assert run.output_schema is not None
    assert "result" in json.dumps(run.output_schema)


def doc_configs() -> list[dict[str, Any]]:
    """The ``pyexec`` entries of the JSON client configs in docs/mcp.md."""
    text = (Path(__file__).parent.parent / "docs" / "mcp.md").read_text()
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.DOTALL)
    return [json.loads(block)["mcpServers"]["pyexec"] for block in blocks]


@pytest.mark.anyio
async def test_documented_client_configs_work(fake_server: LiveServer) -> None:
    """The stdio and HTTP configs of docs/mcp.md connect and run a tool as written."""
    stdio, http = doc_configs()
    assert stdio["command"] == "pyexec"
    env = {
        key: value.replace("http://localhost:8080", fake_server.url).replace("change-me", TOKEN)
        for key, value in stdio["env"].items()
    }
    params = StdioServerParameters(command=PYEXEC, args=stdio["args"], env=env)
    # The fake runner echoes stdin to stdout.
    call = {"code": "print(1)", "stdin": "echoed"}
    async with Client(params) as client:
        assert structured(await client.call_tool("run_python", call))["stdout"] == "echoed"

    assert http["type"] == "http"
    url = http["url"].replace("http://localhost:8080", fake_server.url)
    headers = {k: v.replace("change-me", TOKEN) for k, v in http["headers"].items()}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as client_http,
        Client(streamable_http_client(url, http_client=client_http)) as client,
    ):
        assert structured(await client.call_tool("run_python", call))["stdout"] == "echoed"
