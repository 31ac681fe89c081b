"""Live output in Consul KV: what a running execution printed so far, for every replica.

Layout (``consul_keys``), below the execution's folder::

    live/head               {"stdout": n, "stderr": m}: bytes written, in the same
                            transaction as the blocks it covers, after them
    live/<stream>/NNNNNN    ``LIVE_BLOCK_BYTES`` of a stream each, raw; the last block is
                            rewritten as it fills

Only the replica that drives the run writes here (``append``); any replica reads
(``read``) and waits for changes with one blocking listing of the execution's folder
(``watch``), which also wakes on status changes. The folder is deleted in the
transaction that makes the record terminal (``ConsulStore._write``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

import anyio

from pyexec.errors import Conflict, NotFound
from pyexec.models import TERMINAL, Status
from pyexec.store import OUTPUT_STREAMS, LiveOutput, OutputChunk
from pyexec.store.consul_keys import (
    LIVE_BLOCK_BYTES,
    execution_folder,
    live_block_key,
    live_head_key,
    status_key,
)
from pyexec.store.consul_kv import ConsulKV, kv_op

__all__ = ["append", "read", "watch"]

#: Longest single blocking query.
MAX_BLOCK_SECONDS = 300.0


async def _state(kv: ConsulKV, prefix: str, execution_id: str) -> tuple[Status, dict[str, int]]:
    """The status and the live output's sizes, read in one transaction."""
    skey, hkey = status_key(prefix, execution_id), live_head_key(prefix, execution_id)
    result = await kv.txn([kv_op("get-tree", skey), kv_op("get-tree", hkey)])
    values = {e["Key"]: base64.b64decode(e.get("Value") or "") for e in result.entries}
    if skey not in values:
        raise NotFound(f"no execution {execution_id}")
    sizes = dict.fromkeys(OUTPUT_STREAMS, 0)
    if values.get(hkey):
        held = json.loads(values[hkey])
        sizes.update({s: int(held.get(s) or 0) for s in OUTPUT_STREAMS})
    return Status(values[skey].decode()), sizes


async def append(
    kv: ConsulKV, prefix: str, execution_id: str, chunks: Sequence[OutputChunk]
) -> None:
    status, sizes = await _state(kv, prefix, execution_id)
    if status in TERMINAL:
        return  # dropped already: the record holds the output
    ops: list[str] = []
    for chunk in chunks:
        held = sizes[chunk.stream]
        if chunk.offset > held:
            raise Conflict(
                f"{chunk.stream} of {execution_id} has {held} bytes; "
                f"a chunk at {chunk.offset} would leave a gap",
                code="output_gap",
            )
        data = chunk.data[held - chunk.offset :]
        if not data:
            continue
        first = held // LIVE_BLOCK_BYTES
        partial = b""
        if held % LIVE_BLOCK_BYTES:
            key = live_block_key(prefix, execution_id, chunk.stream, first)
            partial = (await kv.get_raw(key) or b"")[: held % LIVE_BLOCK_BYTES]
            if len(partial) != held % LIVE_BLOCK_BYTES:
                raise Conflict(f"a live output block of {execution_id} is short", code="output_gap")
        content = partial + data
        for i in range(0, len(content), LIVE_BLOCK_BYTES):
            key = live_block_key(prefix, execution_id, chunk.stream, first + i // LIVE_BLOCK_BYTES)
            ops.append(kv_op("set", key, content[i : i + LIVE_BLOCK_BYTES]))
        sizes[chunk.stream] = held + len(data)
    if not ops:
        return
    # Blocks first, the head last (in the last transaction): a reader never sees a size
    # the blocks do not hold yet.
    ops.append(kv_op("set", live_head_key(prefix, execution_id), json.dumps(sizes).encode()))
    await kv.write_all(ops)


async def read(
    kv: ConsulKV, prefix: str, execution_id: str, stream: str, offset: int, limit: int
) -> bytes:
    parts: list[bytes] = []
    got, index = 0, offset // LIVE_BLOCK_BYTES
    skip = offset - index * LIVE_BLOCK_BYTES
    while got < limit:
        block = await kv.get_raw(live_block_key(prefix, execution_id, stream, index))
        if not block:
            break
        piece = block[skip : skip + limit - got]
        parts.append(piece)
        got += len(piece)
        if len(block) < LIVE_BLOCK_BYTES:
            break
        index, skip = index + 1, 0
    return b"".join(parts)


async def watch(
    kv: ConsulKV, prefix: str, execution_id: str, version: int, timeout: float
) -> LiveOutput:
    folder = execution_folder(prefix, execution_id)
    new: int | None = version
    if version:
        remaining = max(timeout, 0.0)
        wait_ms = max(1, int(min(remaining, MAX_BLOCK_SECONDS) * 1000))
        with anyio.move_on_after(remaining):
            new = await kv.block_keys(folder, version, wait_ms)
    else:
        new = await kv.block_keys(folder, 0, 1)
    if new is None:
        raise NotFound(f"no execution {execution_id}")
    status, sizes = await _state(kv, prefix, execution_id)
    return LiveOutput(
        status=status, stdout=sizes["stdout"], stderr=sizes["stderr"], version=max(new, 1)
    )
