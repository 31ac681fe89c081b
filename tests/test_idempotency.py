"""Idempotent submits: one Idempotency-Key, one execution, on one replica or several."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from pyexec.models import ExecutionRequest, RunOutcome
from pyexec.store.memory import MemoryStore

from . import fixtures_consul
from .conftest import app_client, make_settings
from .fakes import FakeRunner, echo_outcome
from .tarfiles import make_tar

pytestmark = pytest.mark.anyio

consul_prefix = fixtures_consul.consul_prefix


class SideEffect:
    """What running the code did: one entry per run, whichever replica ran it."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    def runner(self) -> FakeRunner:
        def outcome(request: ExecutionRequest) -> RunOutcome:
            self.runs.append(request.stdin)
            return echo_outcome(request)

        return FakeRunner(outcome)


def submission(stdin: str = "once", code: str = "print(1)") -> dict[str, Any]:
    return {
        "files": {"tar": ("code.tar", make_tar({"main.py": code}), "application/x-tar")},
        "data": {"metadata": json.dumps({"stdin": stdin})},
    }


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


@pytest.fixture
async def api() -> AsyncIterator[tuple[httpx.AsyncClient, SideEffect]]:
    effect = SideEffect()
    async with app_client(make_settings(), store=MemoryStore(), runner=effect.runner()) as client:
        yield client, effect


@pytest.mark.parametrize("path", ["/api/v1/exec/sync", "/api/v1/exec/async"])
async def test_same_key_same_request_is_one_execution(
    api: tuple[httpx.AsyncClient, SideEffect], path: str
) -> None:
    """Repeating a submit with its key returns the same execution; the code ran once."""
    client, effect = api
    first = await client.post(path, **submission(), headers=keyed("k-1"))
    again = await client.post(path, **submission(), headers=keyed("k-1"))
    assert first.status_code == again.status_code
    assert first.json()["execution_id"] == again.json()["execution_id"]
    other = await client.post(path, **submission())  # no key: a new execution
    assert other.json()["execution_id"] != first.json()["execution_id"]
    record = await client.get(
        f"/api/v1/executions/{first.json()['execution_id']}", params={"wait": 10}
    )
    assert record.json()["stdout"] == "once"
    assert "idempotency" not in record.json()
    # An async submit answers before its launch: wait for the unkeyed one to end too.
    await client.get(f"/api/v1/executions/{other.json()['execution_id']}", params={"wait": 10})
    assert effect.runs == ["once", "once"]  # the keyed pair once, the unkeyed one once


async def test_same_key_other_request_is_409(api: tuple[httpx.AsyncClient, SideEffect]) -> None:
    """A key reused for a different request (metadata or tar) is refused with 409."""
    client, effect = api
    first = await client.post("/api/v1/exec/async", **submission(), headers=keyed("k-2"))
    for changed in (submission(stdin="other"), submission(code="print(2)")):
        refused = await client.post("/api/v1/exec/async", **changed, headers=keyed("k-2"))
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "idempotency_conflict"
        assert error["details"]["execution_id"] == first.json()["execution_id"]
    # An async submit answers before its launch: wait for the one that was accepted.
    await client.get(first.headers["location"], params={"wait": 10})
    assert effect.runs == ["once"]


async def test_eval_is_idempotent_too(api: tuple[httpx.AsyncClient, SideEffect]) -> None:
    """/eval and /eval/async honour the key like the tar API."""
    client, effect = api
    body = {"code": "1 + 1", "stdin": "eval"}
    first = await client.post("/api/v1/eval/async", json=body, headers=keyed("k-3"))
    again = await client.post("/api/v1/eval", json=body, headers=keyed("k-3"))
    assert first.json()["execution_id"] == again.json()["execution_id"]
    assert again.json()["status"] == "completed"
    refused = await client.post("/api/v1/eval", json={**body, "code": "2"}, headers=keyed("k-3"))
    assert refused.json()["error"]["code"] == "idempotency_conflict"
    assert effect.runs == ["eval"]


@pytest.mark.parametrize("bad", ["", "x" * 256, "has space", "naïve"])
async def test_a_malformed_key_is_400(api: tuple[httpx.AsyncClient, SideEffect], bad: str) -> None:
    """An empty, overlong or non-ASCII key is refused before anything runs."""
    client, effect = api
    headers = {"Idempotency-Key": bad.encode()}
    refused = await client.post("/api/v1/exec/async", **submission(), headers=headers)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_idempotency_key"
    assert effect.runs == []


@pytest.mark.consul
async def test_concurrent_submits_to_two_replicas_run_once(consul_prefix: str) -> None:
    """Two replicas on one Consul prefix, hit at once with one key: one run, one id; a
    replica started afterwards (a restart) answers with the same execution."""
    effect = SideEffect()
    settings = make_settings(consul_addr=fixtures_consul.CONSUL_ADDR, consul_prefix=consul_prefix)
    async with AsyncExitStack() as stack:
        first, second = [
            await stack.enter_async_context(app_client(settings, runner=effect.runner()))
            for _ in range(2)
        ]
        answers = await asyncio.gather(
            first.post("/api/v1/exec/sync", **submission(), headers=keyed("shared")),
            second.post("/api/v1/exec/sync", **submission(), headers=keyed("shared")),
            first.post("/api/v1/exec/async", **submission(), headers=keyed("shared")),
            second.post("/api/v1/exec/async", **submission(), headers=keyed("shared")),
        )
        ids = {answer.json()["execution_id"] for answer in answers}
        assert len(ids) == 1, [a.json() for a in answers]
        assert [a.json()["stdout"] for a in answers[:2]] == ["once", "once"]
        assert effect.runs == ["once"]

    async with app_client(settings, runner=effect.runner()) as restarted:
        replay = await restarted.post("/api/v1/exec/sync", **submission(), headers=keyed("shared"))
        assert replay.json()["execution_id"] in ids
        assert replay.json()["stdout"] == "once"
    assert effect.runs == ["once"]
