"""Nothing stuck, nothing lost: a Consul outage with runs in flight, and the reconciler.

The outage test runs against a real, persistent Consul server the test starts itself
(own ports and data dir, not ``-dev``), killed and restarted with runs in flight.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from datetime import timedelta

import pytest

from pyexec.errors import BackendUnavailable
from pyexec.execution_service import ExecutionService
from pyexec.models import Execution, Status, new_execution_id, parse_request, utcnow
from pyexec.store.consul import ConsulStore
from pyexec.store.memory import MemoryStore

from . import fixtures_consul
from .conftest import app_client, make_settings
from .fakes import FakeRunner
from .fixtures_consul import ConsulServer
from .tarfiles import make_tar

pytestmark = pytest.mark.anyio

consul_server = fixtures_consul.consul_server

HELLO = make_tar({"main.py": "print('hello')\n"})
#: Every record must be terminal this long after Consul is back.
SETTLE_SECONDS = 30.0


def held(stdin: str) -> dict[str, object]:
    """A multipart upload whose run holds until the fake runner is told to finish it."""
    return {
        "files": {"tar": ("code.tar", HELLO, "application/x-tar")},
        "data": {"metadata": json.dumps({"stdin": f"hold {stdin}"})},
    }


@pytest.mark.consul
async def test_a_consul_outage_leaves_no_execution_unfinished(
    consul_server: ConsulServer,
) -> None:
    """Consul killed with an async and a sync run in flight, both ending during the outage:
    the sync caller gets 503 with its execution id, and once Consul is back (same data)
    both records reach their real outcome within a bound."""
    settings = make_settings(consul_addr=consul_server.addr, consul_prefix="pyexec-fault")
    runner = FakeRunner()
    store = ConsulStore.from_settings(settings)
    async with app_client(settings, store=store, runner=runner) as client:
        submitted = await client.post("/api/v1/exec/async", **held("async"))
        assert submitted.status_code == 202
        async_id = submitted.json()["execution_id"]
        assert await asyncio.wait_for(runner.launches.get(), 10) == async_id
        sync_call = asyncio.create_task(client.post("/api/v1/exec/sync", **held("sync")))
        sync_id = await asyncio.wait_for(runner.launches.get(), 10)

        consul_server.kill()
        runner.finish(async_id)
        runner.finish(sync_id)
        answer = await asyncio.wait_for(sync_call, 30)
        assert answer.status_code == 503
        error = answer.json()["error"]
        assert error["code"] == "store_unavailable"
        assert error["details"]["execution_id"] == sync_id
        down = await client.get(f"/api/v1/executions/{async_id}")
        assert down.status_code == 503

        consul_server.start()  # same data dir: what was stored before the kill is back
        deadline = time.monotonic() + SETTLE_SECONDS
        for execution_id, stdin in ((async_id, "hold async"), (sync_id, "hold sync")):
            remaining = max(1.0, deadline - time.monotonic())
            record = await client.get(
                f"/api/v1/executions/{execution_id}", params={"wait": remaining}
            )
            assert record.status_code == 200, record.text
            assert record.json()["status"] == "completed", record.json()
            assert record.json()["stdout"] == stdin
        assert time.monotonic() <= deadline + 1


def overdue_record() -> Execution:
    """A pending record some replica stored an hour ago, far past its deadline."""
    request = parse_request({"stdin": "x", "config": {"timeout_seconds": 1}}, make_settings())
    return Execution(
        execution_id=new_execution_id(),
        created_at=utcnow() - timedelta(hours=1),
        request=request,
    )


class SeeingRunner(FakeRunner):
    """A runner that still sees runs launched elsewhere, which end with an exit."""

    async def resume(self, execution: Execution, *, on_output: object = None) -> bool:
        future = asyncio.get_running_loop().create_future()
        future.set_result(self.outcome(execution.request))  # type: ignore[arg-type]
        self._done[execution.execution_id] = future
        return True


async def test_the_reconciler_fails_an_overdue_run_nobody_follows() -> None:
    """An unfinished record past its deadline that no replica follows is failed as lost."""
    store = MemoryStore()
    record = overdue_record()
    await store.create(record, io.BytesIO(HELLO))
    service = ExecutionService(make_settings(), store, FakeRunner())
    assert await service.reconcile() == 1
    final = await store.get(record.execution_id)
    assert final.status is Status.FAILED
    assert "lost" in (final.error or "")
    assert await service.reconcile() == 0
    await service.shutdown()


async def test_the_reconciler_finishes_an_overdue_run_the_runner_still_sees() -> None:
    """An overdue run the runner still sees is followed to its real outcome."""
    store = MemoryStore()
    record = overdue_record()
    await store.create(record, io.BytesIO(HELLO))
    service = ExecutionService(make_settings(), store, SeeingRunner())
    assert await service.reconcile() == 1
    final = await store.wait_terminal(record.execution_id, 10)
    assert final.status is Status.COMPLETED
    assert final.stdout == "x"
    await service.shutdown()


async def test_the_reconciler_leaves_young_and_followed_runs_alone() -> None:
    """A run within its deadline, or one this replica follows, is not touched."""
    store = MemoryStore()
    runner = FakeRunner()
    service = ExecutionService(make_settings(), store, runner)
    young = await service.submit(
        parse_request({"stdin": "hold"}, make_settings()), io.BytesIO(HELLO)
    )
    assert await service.reconcile() == 0
    assert not (await store.get(young.execution_id)).terminal
    await service.shutdown(grace=0)


async def test_a_sync_callers_error_names_its_execution() -> None:
    """A sync run whose launch fails answers with the error and the execution id."""
    runner = FakeRunner()
    runner.fail_start = BackendUnavailable("docker is down", code="runner_unavailable")
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as client:
        answer = await client.post("/api/v1/exec/sync", **held("x"))
    assert answer.status_code == 503
    execution_id = answer.json()["error"]["details"]["execution_id"]
    assert execution_id.startswith("exe_")
