"""``Store.transition``: changes applied inside the store's check-and-set, across replicas."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator

import anyio
import attrs
import pytest

from pyexec.errors import TransitionRefused
from pyexec.models import Execution, Reason, RunOutcome, Status, new_execution_id, utcnow
from pyexec.settings import Settings
from pyexec.store.consul import ConsulStore

from . import fixtures_consul
from .conftest import app_client, make_settings
from .fakes import FakeRunner
from .fixtures_consul import RecordingTransport, kv_keys, kv_raw
from .tarfiles import make_tar

pytestmark = [pytest.mark.anyio, pytest.mark.consul]

consul_prefix = fixtures_consul.consul_prefix
consul_settings = fixtures_consul.consul_settings


@pytest.fixture
async def replicas(consul_settings: Settings) -> AsyncIterator[tuple[ConsulStore, ConsulStore]]:
    """Two stores on the same prefix, as two service replicas have."""
    one = ConsulStore.from_settings(consul_settings)
    two = ConsulStore.from_settings(consul_settings)
    try:
        yield one, two
    finally:
        await one.aclose()
        await two.aclose()


def running(record: Execution) -> Execution:
    return attrs.evolve(record, status=Status.RUNNING, started_at=utcnow())


async def test_a_change_is_applied_to_what_the_other_replica_wrote(
    replicas: tuple[ConsulStore, ConsulStore],
) -> None:
    """A replica whose last known version is stale applies its change to the fresh record."""
    one, two = replicas
    record = Execution(execution_id=new_execution_id())
    await one.create(record, io.BytesIO(make_tar({"main.py": ""})))
    await two.transition(record.execution_id, lambda r: r, expect={Status.PENDING})
    started = await one.transition(record.execution_id, running, expect={Status.PENDING})
    # ``two`` still remembers the pending version; its change must land on ``running``.
    done = await two.transition(
        record.execution_id,
        lambda r: r.finished(RunOutcome(reason=Reason.EXITED, exit_code=0, stdout="out")),
        expect={Status.PENDING, Status.RUNNING},
    )
    assert done.started_at == started.started_at
    assert (await one.get(record.execution_id)) == done


async def test_racing_changes_from_two_replicas_all_land(
    replicas: tuple[ConsulStore, ConsulStore],
) -> None:
    """Twenty concurrent changes split over two replicas: none is lost, none applied twice."""
    one, two = replicas
    record = Execution(execution_id=new_execution_id())
    await one.create(record, io.BytesIO(make_tar({"main.py": ""})))
    await one.transition(record.execution_id, running, expect={Status.PENDING})

    def append(record: Execution) -> Execution:
        return attrs.evolve(record, stdout=record.stdout + "x")

    async with anyio.create_task_group() as tg:
        for i in range(20):
            store = (one, two)[i % 2]
            tg.start_soon(
                lambda s=store: s.transition(record.execution_id, append, expect={Status.RUNNING})
            )
    assert (await two.get(record.execution_id)).stdout == "x" * 20


async def test_two_replicas_ending_one_run_get_one_winner(
    replicas: tuple[ConsulStore, ConsulStore],
) -> None:
    """Finish on one replica and kill on the other: one verdict stands, the loser sees it."""
    one, two = replicas
    record = Execution(execution_id=new_execution_id())
    await one.create(record, io.BytesIO(make_tar({"main.py": ""})))
    results: list[Execution] = []
    refused: list[Execution] = []

    async def end(store: ConsulStore, reason: Reason) -> None:
        try:
            results.append(
                await store.transition(
                    record.execution_id,
                    lambda r: r.finished(RunOutcome(reason=reason)),
                    expect={Status.PENDING, Status.RUNNING},
                )
            )
        except TransitionRefused as exc:
            refused.append(exc.current)

    async with anyio.create_task_group() as tg:
        tg.start_soon(end, one, Reason.EXITED)
        tg.start_soon(end, two, Reason.KILLED)
    assert len(results) == 1
    assert refused == results
    assert await one.get(record.execution_id) == results[0]


#: What a sync run costs in Consul requests with a runner that gets the tar directly
#: (docs/consul-layout.md says the same; issue 10 asks for at most 5).
SYNC_RUN_REQUESTS = 3


async def test_a_sync_run_costs_three_consul_requests(consul_prefix: str) -> None:
    """A sync run through the API (Consul store, local runner) sends three requests to
    Consul: create, running, final; no read, and the tar never goes to Consul."""
    transport = RecordingTransport()
    settings = make_settings(consul_addr=fixtures_consul.CONSUL_ADDR, consul_prefix=consul_prefix)
    store = ConsulStore.from_settings(settings, transport=transport)
    async with app_client(settings, store=store, runner=FakeRunner()) as api:
        before = len(transport.requests)
        response = await api.post(
            "/api/v1/exec/sync",
            files={"tar": ("code.tar", make_tar({"main.py": "print(1)\n"}), "application/x-tar")},
            data={"metadata": json.dumps({"stdin": "hi"})},
        )
        sent = transport.requests[before:]
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"
    assert [f"{r.method} {r.url.path}" for r in sent] == ["PUT /v1/txn"] * SYNC_RUN_REQUESTS
    written = [op["KV"]["Key"] for txn in transport.txns() for op in txn if "Value" in op["KV"]]
    assert not [key for key in written if "/tar/" in key or key.endswith("/manifest")]


async def test_the_folder_shows_the_status_at_a_glance(
    replicas: tuple[ConsulStore, ConsulStore],
) -> None:
    """Each execution folder holds exactly one ``status=<status>`` key, following the record."""
    one, _ = replicas
    record = Execution(execution_id=new_execution_id())
    await one.create(record, None)

    def markers() -> list[str]:
        folder = f"{one.prefix}/executions/{record.execution_id}/"
        return [k.removeprefix(folder) for k in kv_keys(one.prefix) if "status=" in k]

    assert markers() == ["status=pending"]
    await one.transition(record.execution_id, running, expect={Status.PENDING})
    assert markers() == ["status=running"]
    await one.transition(
        record.execution_id,
        lambda r: r.finished(RunOutcome(reason=Reason.EXITED, exit_code=0)),
        expect={Status.RUNNING},
    )
    assert markers() == ["status=completed"]


async def test_records_are_pretty_printed(replicas: tuple[ConsulStore, ConsulStore]) -> None:
    """The record value is indented JSON, one field a line, readable in the Consul UI."""
    one, _ = replicas
    record = Execution(execution_id=new_execution_id())
    await one.create(record, None)
    raw = kv_raw(f"{one.prefix}/executions/{record.execution_id}/record") or b""
    assert raw.startswith(b'{\n "execution_id"')
    assert json.loads(raw)["status"] == "pending"
