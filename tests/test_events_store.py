"""The live output part of the Store contract, on the in-process store and on Consul."""

from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncIterator

import anyio
import attrs
import httpx
import pytest

from pyexec.errors import Conflict, NotFound
from pyexec.models import Execution, Reason, RunOutcome, Status, new_execution_id, utcnow
from pyexec.settings import Settings
from pyexec.store import OutputChunk, Store
from pyexec.store.consul import ConsulStore
from pyexec.store.consul_keys import LIVE_BLOCK_BYTES

from . import fixtures_consul
from .fixtures_consul import CONSUL_ADDR, RecordingTransport, consul_url

pytestmark = pytest.mark.anyio

consul_prefix = fixtures_consul.consul_prefix
consul_settings = fixtures_consul.consul_settings


store = fixtures_consul.store


async def running(store: Store) -> Execution:
    record = Execution(execution_id=new_execution_id())
    await store.create(record, io.BytesIO(b"tar"))
    return await store.transition(
        record.execution_id,
        lambda r: attrs.evolve(r, status=Status.RUNNING, started_at=utcnow()),
        expect={Status.PENDING},
    )


async def test_appended_output_reads_back_byte_exact_across_blocks(store: Store) -> None:
    """Output appended in pieces (crossing block boundaries) reads back byte for byte."""
    eid = (await running(store)).execution_id
    data = os.urandom(LIVE_BLOCK_BYTES * 2 + 123)
    pieces = [data[:100], data[100 : LIVE_BLOCK_BYTES + 7], data[LIVE_BLOCK_BYTES + 7 :]]
    offset = 0
    for piece in pieces:
        await store.append_output(eid, [OutputChunk("stdout", offset, piece)])
        offset += len(piece)
    await store.append_output(eid, [OutputChunk("stderr", 0, b"err")])
    state = await store.watch_output(eid, 0, 0)
    assert (state.stdout, state.stderr, state.status) == (len(data), 3, Status.RUNNING)
    assert await store.read_output(eid, "stdout", 0, len(data) + 10) == data
    assert await store.read_output(eid, "stdout", 5000, 70000) == data[5000:75000]
    assert await store.read_output(eid, "stderr", 1, 10) == b"rr"


async def test_a_repeated_append_is_skipped_and_a_gap_refused(store: Store) -> None:
    """Bytes the store holds already are skipped; a chunk past the end is a Conflict."""
    eid = (await running(store)).execution_id
    await store.append_output(eid, [OutputChunk("stdout", 0, b"hello ")])
    await store.append_output(eid, [OutputChunk("stdout", 0, b"hello world")])
    assert await store.read_output(eid, "stdout", 0, 100) == b"hello world"
    with pytest.raises(Conflict):
        await store.append_output(eid, [OutputChunk("stdout", 50, b"x")])


async def test_watch_wakes_on_output_and_on_status(store: Store) -> None:
    """``watch_output`` returns when output arrives or the status changes, not before."""
    eid = (await running(store)).execution_id
    first = await store.watch_output(eid, 0, 0)
    with anyio.fail_after(5):
        idle = await store.watch_output(eid, first.version, 0.3)
    assert idle.version == first.version
    async with anyio.create_task_group() as group:

        async def write() -> None:
            await anyio.sleep(0.2)
            await store.append_output(eid, [OutputChunk("stderr", 0, b"e")])

        group.start_soon(write)
        with anyio.fail_after(5):
            woke = await store.watch_output(eid, first.version, 30)
    assert woke.version != first.version
    assert woke.stderr == 1
    done = RunOutcome(reason=Reason.EXITED, exit_code=0, stdout="out")
    await store.transition(eid, lambda r: r.finished(done), expect={Status.RUNNING})
    with anyio.fail_after(5):
        ended = await store.watch_output(eid, woke.version, 30)
    assert ended.status is Status.COMPLETED


async def test_live_output_is_dropped_when_the_run_ends(store: Store) -> None:
    """Once terminal the record holds the output: the live copy is gone, appends ignored."""
    eid = (await running(store)).execution_id
    await store.append_output(eid, [OutputChunk("stdout", 0, b"abc")])
    done = RunOutcome(reason=Reason.EXITED, exit_code=0, stdout="abc")
    await store.transition(eid, lambda r: r.finished(done), expect={Status.RUNNING})
    await store.append_output(eid, [OutputChunk("stdout", 3, b"late")])
    state = await store.watch_output(eid, 0, 0)
    assert (state.stdout, state.stderr) == (0, 0)
    assert await store.read_output(eid, "stdout", 0, 10) == b""


async def test_output_of_an_unknown_execution_is_not_found(store: Store) -> None:
    """Watching or appending to an execution that does not exist raises NotFound."""
    with pytest.raises(NotFound):
        await store.watch_output(new_execution_id(), 0, 0)
    with pytest.raises(NotFound):
        await store.append_output(new_execution_id(), [OutputChunk("stdout", 0, b"x")])


@pytest.fixture
async def replicas(
    consul_settings: Settings,
) -> AsyncIterator[tuple[ConsulStore, ConsulStore, RecordingTransport]]:
    """Two Consul stores on one prefix (two replicas); the first one's requests recorded."""
    transport = RecordingTransport()
    first = ConsulStore.from_settings(consul_settings, transport=transport)
    second = ConsulStore.from_settings(consul_settings)
    try:
        yield first, second, transport
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.consul
async def test_the_writer_appends_again_in_one_request(
    replicas: tuple[ConsulStore, ConsulStore, RecordingTransport],
) -> None:
    """The replica that drives a run remembers what it wrote (from the transaction that
    made it running on): each append, the first included, is one checked transaction
    (no read), partial blocks and block boundaries included."""
    first, _, transport = replicas
    eid = (await running(first)).execution_id
    data = os.urandom(LIVE_BLOCK_BYTES + 500)
    offset = 0
    for n, size in enumerate((300, LIVE_BLOCK_BYTES - 100, 300)):
        before = len(transport.requests)
        piece = data[offset : offset + size]
        await first.append_output(
            eid, [OutputChunk("stdout", offset, piece), OutputChunk("stderr", n, b"e")]
        )
        offset += size
        sent = transport.requests[before:]
        assert [r.url.path for r in sent] == ["/v1/txn"], (n, [r.url.path for r in sent])
        verbs = [op["KV"]["Verb"] for op in json.loads(sent[0].content)]
        head_check = "check-not-exists" if n == 0 else "check-index"
        assert verbs[:2] == ["check-index", head_check]
    assert offset == len(data)
    assert await first.read_output(eid, "stdout", 0, len(data)) == data
    assert await first.read_output(eid, "stderr", 0, 10) == b"eee"


@pytest.mark.consul
async def test_an_append_after_another_replica_wrote_reads_and_loses_nothing(
    replicas: tuple[ConsulStore, ConsulStore, RecordingTransport],
) -> None:
    """When another replica wrote meanwhile (a restarted service adopting the run), the
    remembered state is stale: the check fails, the writer reads and appends behind
    what is there, without a gap or a repeat; once the run ended elsewhere an append is
    dropped (its live output is gone with it) and nothing is written back."""
    first, second, _ = replicas
    eid = (await running(first)).execution_id
    # Each append finds the other replica wrote since its own last one (the first one
    # expects no live output at all, having made the run running).
    await second.append_output(eid, [OutputChunk("stdout", 0, b"one ")])
    await first.append_output(eid, [OutputChunk("stdout", 0, b"one two ")])
    await second.append_output(eid, [OutputChunk("stdout", 4, b"two three ")])
    await first.append_output(eid, [OutputChunk("stdout", 8, b"three four")])
    await second.append_output(eid, [OutputChunk("stdout", 18, b" five")])
    assert await second.read_output(eid, "stdout", 0, 100) == b"one two three four five"
    done = RunOutcome(reason=Reason.EXITED, exit_code=0, stdout="one two three four five")
    await second.transition(eid, lambda r: r.finished(done), expect={Status.RUNNING})
    await first.append_output(eid, [OutputChunk("stdout", 23, b" late")])
    state = await first.watch_output(eid, 0, 0)
    assert (state.status, state.stdout, state.stderr) == (Status.COMPLETED, 0, 0)
    async with httpx.AsyncClient() as http:
        response = await http.get(
            f"{consul_url(CONSUL_ADDR)}/v1/kv/{first.prefix}/", params={"keys": ""}
        )
    listed = response.json()
    assert not [key for key in listed if eid in key and "/live/" in key]
