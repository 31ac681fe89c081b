"""The embedded default end to end: HTTP API → service → in-process store → real Docker."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from .tarfiles import make_tar

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def upload(files: dict[str, str], metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "files": {"tar": ("code.tar", make_tar(files), "application/x-tar")},
        "data": {"metadata": json.dumps(metadata)},
    }


async def test_a_project_runs_with_stdin_env_and_args(api: httpx.AsyncClient) -> None:
    """A multi-file project sees its stdin, env vars and args; its exit code passes through."""
    files = {
        "app/main.py": (
            "import os, sys\n"
            "from helper import shout\n"
            "print(shout(sys.stdin.read()), os.environ['GREETING'], sys.argv[1:])\n"
            "print('to stderr', file=sys.stderr)\n"
            "raise SystemExit(3)\n"
        ),
        "app/helper.py": "def shout(s):\n    return s.upper()\n",
    }
    metadata = {
        "entrypoint": "app/main.py",
        "stdin": "hi",
        "env_vars": ["GREETING=hello=world"],
        "script_args": ["a b", "--c"],
    }
    response = await api.post("/api/v1/exec/sync", **upload(files, metadata))
    record = response.json()
    assert response.status_code == 200, record
    assert record["status"] == "completed"
    assert record["reason"] == "exited"
    assert record["exit_code"] == 3
    assert record["stdout"] == "HI hello=world ['a b', '--c']\n"
    assert record["stderr"] == "to stderr\n"
    assert record["duration_ms"] >= 0


async def test_a_timeout_is_a_failure_with_its_own_reason(api: httpx.AsyncClient) -> None:
    """A busy loop past its timeout ends failed/timeout, never completed."""
    metadata = {"config": {"timeout_seconds": 2}}
    response = await api.post(
        "/api/v1/exec/sync", **upload({"main.py": "while True: pass\n"}, metadata)
    )
    record = response.json()
    assert record["status"] == "failed"
    assert record["reason"] == "timeout"
    assert record["duration_ms"] < 2000 + 5000


async def test_async_kill_while_running(api: httpx.AsyncClient) -> None:
    """An async run that is killed ends killed with the output it had produced."""
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"
    accepted = await api.post("/api/v1/exec/async", **upload({"main.py": code}, {}))
    execution_id = accepted.json()["execution_id"]
    # Wait (bounded) until the script has printed, through the public logs endpoint.
    for _ in range(100):
        logs = (await api.get(f"/api/v1/executions/{execution_id}/logs")).json()
        if "started" in logs["stdout"]:
            break
        await api.get(f"/api/v1/executions/{execution_id}", params={"wait": 0.1})
    assert logs["status"] == "running"
    killed = (await api.delete(f"/api/v1/executions/{execution_id}")).json()
    assert killed["status"] == "killed"
    final = (await api.get(f"/api/v1/executions/{execution_id}", params={"wait": 30})).json()
    assert final["status"] == "killed"
    assert final["reason"] == "killed"
    assert "started" in final["stdout"]


@pytest.mark.parametrize(
    ("field", "metadata"),
    [
        ("script_args", {"script_args": ["a\0b"]}),
        ("env_vars", {"env_vars": ["NAME=a\0b"]}),
        ("pre_commands", {"pre_commands": ["echo a\0b"]}),
    ],
)
async def test_what_no_process_can_be_given_is_refused_before_it_runs(
    api: httpx.AsyncClient, field: str, metadata: dict[str, Any]
) -> None:
    """A NUL byte in an argument, env value or setup command is a 400 with a stable code
    (the local runner cannot pass it on), not a run that fails inside the sandbox."""
    response = await api.post("/api/v1/exec/sync", **upload({"main.py": "print(1)"}, metadata))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "nul_in_argument"
    assert field in error["message"]
