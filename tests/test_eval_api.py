"""POST /api/v1/eval through the real app: HTTP errors with a runner double, runs on Docker."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from pyexec.store.memory import MemoryStore

from .conftest import CA_BUNDLE, app_client, make_settings
from .fakes import FakeRunner

pytestmark = pytest.mark.anyio

EVAL = "/api/v1/eval"


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# --- HTTP behaviour (no sandbox: a runner double) -----------------------------------------------


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
async def api(runner: FakeRunner) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(max_eval_code_bytes=1000, setup_network=True)
    async with app_client(settings, store=MemoryStore(), runner=runner) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"code": "1", "files": [{"name": "main.py", "content": "1"}]}, 400, "code_and_files"),
        ({}, 400, "missing_code"),
        ({"code": "1", "docker_image": "x"}, 400, "unknown_field"),
        ({"code": "1", "python_version": "2.7"}, 400, "unsupported_python_version"),
        ({"code": "x" * 1001}, 413, "code_too_large"),
        ([1, 2], 400, "invalid_request"),
    ],
)
async def test_bad_bodies_get_a_status_and_code(
    api: httpx.AsyncClient, body: Any, status: int, code: str
) -> None:
    """Invalid eval bodies are refused with the documented status and error code."""
    response = await api.post(EVAL, json=body)
    assert response.status_code == status, response.text
    assert error_code(response) == code


async def test_unsupported_version_lists_the_supported_ones(api: httpx.AsyncClient) -> None:
    """The 400 for an unknown python_version names the versions this server has."""
    response = await api.post(EVAL, json={"code": "1", "python_version": "3.99"})
    error = response.json()["error"]
    assert "supported: 3.11" in error["message"]
    assert error["details"]["supported"] == ["3.11"]


async def test_body_that_is_not_json(api: httpx.AsyncClient) -> None:
    """A body that is not JSON → 400 invalid_json."""
    response = await api.post(
        EVAL, content=b"{code: 1", headers={"content-type": "application/json"}
    )
    assert (response.status_code, error_code(response)) == (400, "invalid_json")


async def test_oversized_body_is_refused_before_parsing(api: httpx.AsyncClient) -> None:
    """A body far over any sensible size is a 413 without being decoded."""
    from pyexec.api.eval import max_body_bytes

    limit = max_body_bytes(make_settings(max_eval_code_bytes=1000))
    response = await api.post(EVAL, content=b" " * (limit + 1))
    assert (response.status_code, error_code(response)) == (413, "code_too_large")


async def test_record_shape_and_stored_request(api: httpx.AsyncClient, runner: FakeRunner) -> None:
    """The answer is the tar API's record; the runner got the wrapper as entrypoint."""
    response = await api.post(EVAL, json={"code": "import json\nprint(1)", "stdin": "in"})
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["status"] == "completed"
    assert record["stdout"] == "in"  # the double echoes stdin
    assert record["auto_requirements"] == []
    assert "result" not in record
    assert "error_type" not in record
    fetched = await api.get(f"/api/v1/executions/{record['execution_id']}")
    assert fetched.json() == record


# --- real runs on Docker ------------------------------------------------------------------


@pytest.fixture
async def docker_api() -> AsyncIterator[httpx.AsyncClient]:
    # Setup with the network, so auto-install is on (auto_requirements reported).
    async with app_client(make_settings(default_timeout=60, setup_network=True)) as client:
        yield client


async def evaluate(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post(EVAL, json=body)
    assert response.status_code == 200, response.text
    record: dict[str, Any] = response.json()
    return record


@pytest.mark.docker
@pytest.mark.parametrize(
    ("code", "result", "stdout"),
    [
        ("2 + 2", "4", ""),
        ("x = 5\nx * 2", "10", ""),
        ("x = 5", None, ""),
        ('print("hi")', None, "hi\n"),
        ("[1, 2, 3]", "[1, 2, 3]", ""),
        ('"hello"', "'hello'", ""),
    ],
)
async def test_repl_results_in_the_sandbox(
    docker_api: httpx.AsyncClient, code: str, result: str | None, stdout: str
) -> None:
    """eval_last_expr returns the final expression's repr; null when there is none."""
    record = await evaluate(docker_api, code=code, eval_last_expr=True)
    assert record["status"] == "completed", record
    assert record["exit_code"] == 0
    assert record.get("result") == result
    assert record["stdout"] == stdout
    assert record["stderr"] == ""
    assert "error_type" not in record
    assert record["auto_requirements"] == []


@pytest.mark.docker
async def test_top_level_await_in_the_sandbox(docker_api: httpx.AsyncClient) -> None:
    """Top-level await runs, and the final expression may await on the same loop."""
    code = textwrap.dedent(
        """\
        import asyncio
        lock = asyncio.Lock()
        async with lock:
            n = 20
        await asyncio.sleep(0, n + 1)
        """
    )
    record = await evaluate(docker_api, code=code, eval_last_expr=True)
    assert (record["status"], record.get("result")) == ("completed", "21"), record


@pytest.mark.docker
async def test_name_error_in_the_sandbox(docker_api: httpx.AsyncClient) -> None:
    """A NameError comes back as error_type/error_line, traceback without wrapper frames."""
    record = await evaluate(docker_api, code="a = 1\nprint(a)\nprint(b)\n", eval_last_expr=True)
    assert (record["status"], record["exit_code"], record["reason"]) == ("completed", 1, "exited")
    assert (record["error_type"], record["error_line"]) == ("NameError", 3)
    assert record["stdout"] == "1\n"
    assert record["stderr"] == textwrap.dedent(
        """\
        Traceback (most recent call last):
          File "/work/main.py", line 3, in <module>
            print(b)
                  ^
        NameError: name 'b' is not defined
        """
    )
    assert "result" not in record


@pytest.mark.docker
async def test_zero_division_inside_a_function_in_the_sandbox(
    docker_api: httpx.AsyncClient,
) -> None:
    """The error line is the raise site inside the user's function."""
    code = "def f(n):\n    return 10 / n\n\n\nf(0)\n"
    record = await evaluate(docker_api, code=code)
    assert (record["error_type"], record["error_line"]) == ("ZeroDivisionError", 2)
    assert record["stderr"].startswith("Traceback (most recent call last):\n")
    assert '"/work/main.py", line 5, in <module>' in record["stderr"]
    assert ".pyexec" not in record["stderr"]


@pytest.mark.docker
async def test_syntax_error_in_the_sandbox(docker_api: httpx.AsyncClient) -> None:
    """A SyntaxError reports its line and prints like Python's own."""
    record = await evaluate(docker_api, code="x = 1\nprint(x\n", eval_last_expr=True)
    assert (record["error_type"], record["error_line"]) == ("SyntaxError", 2)
    assert record["stderr"].startswith('  File "/work/main.py", line 2\n')
    assert record["stdout"] == ""


@pytest.mark.docker
async def test_module_not_found_in_the_sandbox(docker_api: httpx.AsyncClient) -> None:
    """Without auto-install, a third-party import fails as ModuleNotFoundError."""
    record = await evaluate(docker_api, code="import os\nimport six\n", auto_requirements=False)
    assert (record["error_type"], record["error_line"]) == ("ModuleNotFoundError", 2)
    assert "auto_requirements" not in record


@pytest.mark.docker
async def test_project_files_stdin_args_and_env(docker_api: httpx.AsyncClient) -> None:
    """files[], entrypoint, stdin, script_args and env_vars reach the program."""
    files = [
        {"name": "app/run.py", "content": "import os, sys, tool\ntool.show(sys.stdin.read())\n"},
        {
            "name": "app/tool.py",
            "content": "import os, sys\n"
            "def show(text):\n"
            "    print(text, sys.argv[1:], os.environ['GREETING'])\n",
        },
    ]
    record = await evaluate(
        docker_api,
        files=files,
        entrypoint="app/run.py",
        stdin="piped",
        script_args=["--flag"],
        env_vars=["GREETING=hey"],
    )
    assert record["status"] == "completed", record
    assert record["stdout"] == "piped ['--flag'] hey\n"


@pytest.mark.docker
@pytest.mark.network
async def test_auto_install_through_the_package_index() -> None:
    """An import of six is detected, installed in the setup phase, and reported."""
    settings = make_settings(default_timeout=120, ca_bundle=CA_BUNDLE, setup_network=True)
    async with app_client(settings) as client:
        record = await evaluate(
            client, code="import six\nsix.ensure_str(b'installed')", eval_last_expr=True
        )
    assert record["status"] == "completed", record
    assert record["auto_requirements"] == ["six"]
    assert record["result"] == "'installed'"


@pytest.mark.docker
async def test_async_eval_then_poll(docker_api: httpx.AsyncClient) -> None:
    """/eval/async answers 202 at once; the polled record carries the eval result."""
    response = await docker_api.post(
        EVAL + "/async", json={"code": "6 * 7", "eval_last_expr": True}
    )
    assert response.status_code == 202, response.text
    location = response.headers["location"]
    record = (await docker_api.get(location, params={"wait": 30})).json()
    assert (record["status"], record.get("result"), record["stderr"]) == ("completed", "42", "")
