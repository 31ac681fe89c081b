"""The live output part of the Store contract, on the in-process store and on Consul."""

from __future__ import annotations

import io
import os

import anyio
import attrs
import pytest

from pyexec.errors import Conflict, NotFound
from pyexec.models import Execution, Reason, RunOutcome, Status, new_execution_id, utcnow
from pyexec.store import OutputChunk, Store
from pyexec.store.consul_keys import LIVE_BLOCK_BYTES

from . import fixtures_consul

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
