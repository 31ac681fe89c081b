"""Live output in Consul KV: what a running execution printed so far, for every replica.

Layout (``consul_keys``), below the execution's folder::

    live/head               {"stdout": n, "stderr": m}: bytes written, in the same
                            transaction as the blocks it covers, after them
    live/<stream>/NNNNNN    ``LIVE_BLOCK_BYTES`` of a stream each, raw; the last block is
                            rewritten as it fills

Only the replica that drives the run writes here (``LiveWriter.append``): one
transaction per flush, since it remembers what it wrote and checks in that
transaction that nobody else wrote nor changed the status since (else it reads first,
as after a restart). Any replica reads (``read``) and waits for changes with one
blocking listing of the execution's folder (``watch``), which also wakes on status
changes. The folder is deleted in the
transaction that makes the record terminal (``ConsulStore._write``).
"""

from __future__ import annotations

import base64
import json
from collections import OrderedDict
from collections.abc import Sequence

import anyio
import attrs

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
from pyexec.store.consul_kv import ConsulKV, TxnResult, kv_op

__all__ = ["LiveWriter", "read", "watch"]

#: Longest single blocking query.
MAX_BLOCK_SECONDS = 300.0


async def _state(
    kv: ConsulKV, prefix: str, execution_id: str
) -> tuple[Status, dict[str, int], int]:
    """The status, the live output's sizes and the status key's ModifyIndex, read in one
    transaction."""
    skey, hkey = status_key(prefix, execution_id), live_head_key(prefix, execution_id)
    result = await kv.txn([kv_op("get-tree", skey), kv_op("get-tree", hkey)])
    values = {e["Key"]: base64.b64decode(e.get("Value") or "") for e in result.entries}
    if skey not in values:
        raise NotFound(f"no execution {execution_id}")
    sizes = dict.fromkeys(OUTPUT_STREAMS, 0)
    if values.get(hkey):
        held = json.loads(values[hkey])
        sizes.update({s: int(held.get(s) or 0) for s in OUTPUT_STREAMS})
    return Status(values[skey].decode()), sizes, result.modify_index(skey) or 0


@attrs.define
class _Tail:
    """What this process last wrote of one execution's live output: its sizes, the
    bytes of each stream's last, partial block, and the ModifyIndex of the status key
    and of the head then (0: no head yet, ``begin``). While both hold (checked in the
    write's own transaction) nobody else wrote the output nor changed the status since,
    so the next append needs no read."""

    sizes: dict[str, int]
    partial: dict[str, bytes]
    status_index: int
    head_index: int


def _ops(
    prefix: str,
    execution_id: str,
    chunks: Sequence[OutputChunk],
    sizes: dict[str, int],
    partial: dict[str, bytes],
) -> list[str]:
    """The block writes that append ``chunks`` to output of ``sizes`` whose last partial
    blocks are ``partial`` (both updated in place), the head last; ``[]`` when nothing
    is new. ``Conflict`` for a chunk that would leave a gap."""
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
        content = partial[chunk.stream] + data
        for i in range(0, len(content), LIVE_BLOCK_BYTES):
            key = live_block_key(prefix, execution_id, chunk.stream, first + i // LIVE_BLOCK_BYTES)
            ops.append(kv_op("set", key, content[i : i + LIVE_BLOCK_BYTES]))
        sizes[chunk.stream] = held + len(data)
        partial[chunk.stream] = content[len(content) - sizes[chunk.stream] % LIVE_BLOCK_BYTES :]
    if ops:
        # Blocks first, the head last (in the last transaction): a reader never sees a
        # size the blocks do not hold yet.
        ops.append(kv_op("set", live_head_key(prefix, execution_id), json.dumps(sizes).encode()))
    return ops


class LiveWriter:
    """Appends live output (the replica that drives a run), remembering what it wrote
    (``_Tail``) so that the next append of the same execution is one transaction: the
    blocks and the head, with a check of both indexes. When a check fails (another
    process wrote, the status changed) it reads the state and writes as a first append
    does. At most ``keep`` executions are remembered, the least recently used dropped."""

    def __init__(self, kv: ConsulKV, prefix: str, keep: int = 256) -> None:
        self._kv = kv
        self._prefix = prefix
        self._keep = keep
        self._tails: OrderedDict[str, _Tail] = OrderedDict()

    def begin(self, execution_id: str, status_index: int | None) -> None:
        """``execution_id`` has just been made running by this process (its status key
        at ``status_index``), with no live output: its first append is one transaction
        too (checking that the head does not exist yet)."""
        if status_index:
            self._put(
                execution_id,
                _Tail(
                    dict.fromkeys(OUTPUT_STREAMS, 0),
                    dict.fromkeys(OUTPUT_STREAMS, b""),
                    status_index,
                    0,
                ),
            )

    def forget(self, execution_id: str) -> None:
        """Drop what is remembered of ``execution_id`` (its output is final now)."""
        self._tails.pop(execution_id, None)

    async def append(self, execution_id: str, chunks: Sequence[OutputChunk]) -> None:
        tail = self._tails.pop(execution_id, None)
        if tail is not None and await self._append_remembered(execution_id, chunks, tail):
            return
        kv, prefix = self._kv, self._prefix
        status, sizes, status_index = await _state(kv, prefix, execution_id)
        if status in TERMINAL:
            return  # dropped already: the record holds the output
        partial = dict.fromkeys(OUTPUT_STREAMS, b"")
        for stream in OUTPUT_STREAMS:
            held = sizes[stream] % LIVE_BLOCK_BYTES
            if held:
                index = sizes[stream] // LIVE_BLOCK_BYTES
                key = live_block_key(prefix, execution_id, stream, index)
                partial[stream] = (await kv.get_raw(key) or b"")[:held]
                if len(partial[stream]) != held:
                    raise Conflict(
                        f"a live output block of {execution_id} is short", code="output_gap"
                    )
        ops = _ops(prefix, execution_id, chunks, sizes, partial)
        if not ops:
            return
        if not kv.batch().fits(*ops):
            await kv.write_all(ops)  # more than one transaction: nothing remembered
            return
        result = await kv.txn(ops)
        if not result.ok:  # pragma: no cover - a transaction without checks applies or errs
            raise Conflict("a concurrent change got in the way", code="invalid_transition")
        self._remember(execution_id, sizes, partial, status_index, result)

    async def _append_remembered(
        self, execution_id: str, chunks: Sequence[OutputChunk], tail: _Tail
    ) -> bool:
        """Append in one checked transaction from what is remembered; ``False`` when that
        cannot be done (a check failed, a gap, too much for one transaction)."""
        kv, prefix = self._kv, self._prefix
        sizes, partial = dict(tail.sizes), dict(tail.partial)
        try:
            ops = _ops(prefix, execution_id, chunks, sizes, partial)
        except Conflict:  # a gap from what this process wrote: another one wrote since?
            return False
        if not ops:
            self._tails[execution_id] = tail
            return True
        head = live_head_key(prefix, execution_id)
        checks = [
            kv_op("check-index", status_key(prefix, execution_id), index=tail.status_index),
            kv_op("check-index", head, index=tail.head_index)
            if tail.head_index
            else kv_op("check-not-exists", head),
        ]
        if not kv.batch().fits(*checks, *ops):
            return False
        result = await kv.txn(checks + ops)
        if not result.ok:
            return False
        self._remember(execution_id, sizes, partial, tail.status_index, result)
        return True

    def _remember(
        self,
        execution_id: str,
        sizes: dict[str, int],
        partial: dict[str, bytes],
        status_index: int,
        result: TxnResult,
    ) -> None:
        head = result.modify_index(live_head_key(self._prefix, execution_id))
        if head is not None and status_index:
            self._put(execution_id, _Tail(sizes, partial, status_index, head))

    def _put(self, execution_id: str, tail: _Tail) -> None:
        self._tails[execution_id] = tail
        while len(self._tails) > self._keep:
            self._tails.popitem(last=False)


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
    status, sizes, _ = await _state(kv, prefix, execution_id)
    return LiveOutput(
        status=status, stdout=sizes["stdout"], stderr=sizes["stderr"], version=max(new, 1)
    )
