"""The few KV calls ``ConsulStore`` makes, on py-consul: transactions, raw values, trees.

Transactions are built from operations serialised once (``kv_op``) so a ``TxnBatch``
can count them against Consul's limits (64 ops before Consul 1.14, a 512 KiB body
in which values travel base64) before anything is sent.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import anyio
import attrs
import consul.base
import consul.callback

from pyexec.errors import BackendError, Conflict
from pyexec.store.consul_http import AsyncConsul

__all__ = ["MAX_TXN_BYTES", "MAX_TXN_OPS", "ConsulKV", "TxnBatch", "TxnResult", "kv_op"]

#: Operations per transaction Consul 1.8 accepts (1.14 and later: 128).
MAX_TXN_OPS = 64
#: Body bytes per transaction (``txn_max_req_len``); values travel base64 inside it.
MAX_TXN_BYTES = 512 * 1024
#: Seconds the best-effort cleanup after a failed write may take.
CLEANUP_SECONDS = 5.0


def kv_op(verb: str, key: str, value: bytes | None = None, index: int | None = None) -> str:
    """One txn operation as JSON text (its length counts against the body budget)."""
    kv: dict[str, Any] = {"Verb": verb, "Key": key}
    if value is not None:
        kv["Value"] = base64.b64encode(value).decode("ascii")
    if index is not None:
        kv["Index"] = index
    return json.dumps({"KV": kv}, separators=(",", ":"))


@attrs.define
class TxnBatch:
    """Operations for one transaction, kept within the op and body limits."""

    max_ops: int = MAX_TXN_OPS
    max_bytes: int = MAX_TXN_BYTES
    ops: list[str] = attrs.field(factory=list)
    size: int = 2  # the brackets

    def fits(self, *ops: str) -> bool:
        extra = sum(len(op) + 1 for op in ops)
        return len(self.ops) + len(ops) <= self.max_ops and self.size + extra <= self.max_bytes

    def add(self, *ops: str) -> None:
        self.ops.extend(ops)
        self.size += sum(len(op) + 1 for op in ops)


@attrs.frozen
class TxnResult:
    ok: bool
    #: The KV entries the operations returned (``Value`` base64 or None), in order.
    entries: list[dict[str, Any]]
    failed_ops: frozenset[int]

    def modify_index(self, key: str) -> int | None:
        """The ModifyIndex ``key`` got from this transaction, if the answer names it."""
        for entry in self.entries:
            if entry.get("Key") == key and "ModifyIndex" in entry:
                return int(entry["ModifyIndex"])
        return None


def _txn_answer(response: consul.base.Response) -> TxnResult:
    if response.code == 409:  # a check failed: nothing was applied
        errors = json.loads(response.body).get("Errors") or []
        return TxnResult(False, [], frozenset(int(e.get("OpIndex", -1)) for e in errors))
    consul.callback.CB._status(response)
    results = json.loads(response.body).get("Results") or []
    return TxnResult(True, [r["KV"] for r in results if "KV" in r], frozenset())


def _raw_answer(response: consul.base.Response) -> bytes | None:
    if response.code == 404:
        return None
    consul.callback.CB._status(response)
    body: bytes = response.body
    return body


class ConsulKV:
    """KV operations over one client for requests and one for blocking queries."""

    def __init__(
        self,
        client: AsyncConsul,
        watch_client: AsyncConsul,
        *,
        max_txn_ops: int = MAX_TXN_OPS,
        max_txn_bytes: int = MAX_TXN_BYTES,
    ) -> None:
        self.client = client
        self.watch_client = watch_client
        self.max_txn_ops = max_txn_ops
        self.max_txn_bytes = max_txn_bytes

    def batch(self) -> TxnBatch:
        return TxnBatch(self.max_txn_ops, self.max_txn_bytes)

    async def txn(self, ops: list[str]) -> TxnResult:
        if len(ops) > self.max_txn_ops:
            raise BackendError(f"a transaction of {len(ops)} ops was planned", code="store_error")
        body = "[" + ",".join(ops) + "]"
        result: TxnResult = await self.client.http.put(_txn_answer, "/v1/txn", data=body)
        return result

    async def write_all(self, ops: list[str]) -> None:
        """Write ``ops`` in as many transactions as the limits need."""
        batch = self.batch()
        for op in ops:
            if not batch.fits(op):
                await self._apply(batch.ops)
                batch = self.batch()
            batch.add(op)
        if batch.ops:
            await self._apply(batch.ops)

    async def _apply(self, ops: list[str]) -> None:
        if not (await self.txn(ops)).ok:
            raise Conflict("a concurrent change got in the way", code="invalid_transition")

    async def get(self, key: str) -> dict[str, Any] | None:
        """The KV entry (``Value`` as bytes, ``ModifyIndex``, ...) or ``None``."""
        _, item = await self.client.kv.get(key)
        entry: dict[str, Any] | None = item
        return entry

    async def get_raw(self, key: str) -> bytes | None:
        """The value as stored, as ``GET ?raw`` returns it (uncompressed: chunks are big)."""
        data: bytes | None = await self.client.http.get(
            _raw_answer, f"/v1/kv/{key}", params=[("raw", "1")],
            headers={"Accept-Encoding": "identity"}, raw=True,
        )  # fmt: skip
        return data

    async def put_new(self, key: str, value: bytes) -> bool:
        """Write ``value`` raw (no base64) if ``key`` does not exist yet; whether it did."""
        created: bool = await self.client.kv.put(key, value, cas=0)
        return created

    async def folders(self, root: str) -> list[str]:
        """The keys one level below ``root``, folders ending in ``/``."""
        _, keys = await self.client.kv.get(root, keys=True, separator="/")
        return list(keys or ())

    async def block(self, key: str, index: int, wait_ms: int) -> tuple[int, bytes | None]:
        """A blocking read: returns once ``key`` changes after ``index`` or the wait ends."""
        new_index, item = await self.watch_client.kv.get(
            key, index=index or None, wait=f"{wait_ms}ms"
        )
        return int(new_index), None if item is None else (item.get("Value") or b"")

    async def delete_tree(self, folder: str) -> None:
        await self.client.kv.delete(folder, recurse=True)

    async def cleanup(self, folder: str) -> None:
        """Best effort, even while being cancelled; the janitor gets whatever stays."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(CLEANUP_SECONDS),
            contextlib.suppress(BackendError),
        ):
            await self.delete_tree(folder)

    async def leader(self) -> str:
        leader: str = await self.client.status.leader()
        return leader

    async def aclose(self) -> None:
        await self.client.http.close()
        await self.watch_client.http.close()
