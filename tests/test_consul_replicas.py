"""Two service instances against one Consul: what one accepts, the other reads and kills."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest

from . import fixtures_consul
from .conftest import app_client, make_settings
from .tarfiles import make_tar

pytestmark = [pytest.mark.anyio, pytest.mark.consul, pytest.mark.docker]

consul_prefix = fixtures_consul.consul_prefix


@pytest.fixture
async def replicas(
    consul_prefix: str,
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """Two apps (Consul store, local Docker runner) sharing one KV prefix, both started."""
    settings = make_settings(consul_addr=fixtures_consul.CONSUL_ADDR, consul_prefix=consul_prefix)
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(app_client(settings))
        second = await stack.enter_async_context(app_client(settings))
        yield first, second


def submission(code: str, timeout: int = 30) -> dict[str, object]:
    metadata = {"config": {"timeout_seconds": timeout}}
    return {
        "files": {"tar": ("code.tar", make_tar({"main.py": code}), "application/x-tar")},
        "data": {"metadata": json.dumps(metadata)},
    }


async def test_both_replicas_use_the_consul_backend(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """Each instance reports the Consul backend and a healthy store."""
    for api in replicas:
        assert (await api.get("/api/v1/version")).json()["backend"] == "consul"
        assert (await api.get("/health")).json()["checks"]["store"] == "ok"


async def test_submitted_to_one_killed_through_the_other(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """An async execution accepted by instance A is read and killed through instance B."""
    first, second = replicas
    accepted = await first.post("/api/v1/exec/async", **submission("import time\ntime.sleep(20)\n"))
    assert accepted.status_code == 202
    execution_id = accepted.json()["execution_id"]

    seen = await second.get(f"/api/v1/executions/{execution_id}")
    assert seen.status_code == 200
    assert seen.json()["execution_id"] == execution_id
    assert seen.json()["status"] in {"pending", "running"}

    killed = await second.delete(f"/api/v1/executions/{execution_id}")
    assert killed.status_code == 200
    assert killed.json()["status"] == "killed"

    final = await first.get(f"/api/v1/executions/{execution_id}", params={"wait": 30})
    assert final.json()["status"] == "killed"
    assert final.json()["reason"] == "killed"


async def test_waiting_on_one_replica_sees_the_other_finish(
    replicas: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    """A long-poll on B returns as soon as the run driven by A has finished."""
    first, second = replicas
    accepted = await first.post("/api/v1/exec/async", **submission("print('from A')\n"))
    execution_id = accepted.json()["execution_id"]
    record = (await second.get(f"/api/v1/executions/{execution_id}", params={"wait": 60})).json()
    assert record["status"] == "completed"
    assert record["stdout"] == "from A\n"
    assert record["exit_code"] == 0
