"""The few KV calls ``ConsulStore`` makes (``consul_http``): transactions, raw values, trees.

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
import httpx

from pyexec.errors import BackendError, Conflict
from pyexec.store.consul_http import ConsulHTTP

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
        """The ModifyIndex ``key`` got from this transaction, if the answer names it: its
        last entry (a check of ``key`` before its write answers with the index before)."""
        for entry in reversed(self.entries):
            if entry.get("Key") == key and "ModifyIndex" in entry:
                return int(entry["ModifyIndex"])
        return None


def _txn_answer(response: httpx.Response) -> TxnResult:
    if response.status_code == 409:  # a check failed: nothing was applied
        errors = response.json().get("Errors") or []
        return TxnResult(False, [], frozenset(int(e.get("OpIndex", -1)) for e in errors))
    results = response.json().get("Results") or []
    return TxnResult(True, [r["KV"] for r in results if "KV" in r], frozenset())


def _entry(item: dict[str, Any]) -> dict[str, Any]:
    """A KV entry as ``/v1/kv`` lists it, with ``Value`` decoded to bytes (or None)."""
    raw = item.get("Value")
    return {**item, "Value": None if raw is None else base64.b64decode(raw)}


class ConsulKV:
    """KV operations over one client for requests and one for blocking queries."""

    def __init__(
        self,
        client: ConsulHTTP,
        watch_client: ConsulHTTP,
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
        response = await self.client.request("PUT", "/v1/txn", content=body, ok=(409,))
        return _txn_answer(response)

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
        response = await self.client.request("GET", f"/v1/kv/{key}", ok=(404,))
        if response.status_code == 404:
            return None
        items: list[dict[str, Any]] = response.json()
        return _entry(items[0]) if items else None

    async def get_raw(self, key: str) -> bytes | None:
        """The value as stored, as ``GET ?raw`` returns it (uncompressed: chunks are big)."""
        response = await self.client.request(
            "GET", f"/v1/kv/{key}", params={"raw": ""},
            headers={"Accept-Encoding": "identity"}, ok=(404,),
        )  # fmt: skip
        return None if response.status_code == 404 else response.content

    async def put_new(self, key: str, value: bytes) -> bool:
        """Write ``value`` raw (no base64) if ``key`` does not exist yet; whether it did."""
        response = await self.client.request(
            "PUT", f"/v1/kv/{key}", params={"cas": 0}, content=value
        )
        return response.json() is True

    async def folders(self, root: str) -> list[str]:
        """The keys one level below ``root``, folders ending in ``/``."""
        response = await self.client.request(
            "GET", f"/v1/kv/{root}", params={"keys": "", "separator": "/"}, ok=(404,)
        )
        if response.status_code == 404:
            return []
        keys: list[str] = response.json()
        return keys

    async def block(self, key: str, index: int, wait_ms: int) -> tuple[int, bytes | None]:
        """A blocking read: returns once ``key`` changes after ``index`` or the wait ends."""
        params: dict[str, str | int] = {"wait": f"{wait_ms}ms"}
        if index:
            params["index"] = index
        response = await self.watch_client.request(
            "GET", f"/v1/kv/{key}", params=params, wait_seconds=wait_ms / 1000, ok=(404,)
        )
        new_index = int(response.headers.get("X-Consul-Index") or 0)
        items = [] if response.status_code == 404 else response.json()
        if not items:
            return new_index, None
        return new_index, _entry(items[0])["Value"] or b""

    async def block_keys(self, folder: str, index: int, wait_ms: int) -> int | None:
        """A blocking listing of the keys below ``folder``: returns its index once anything
        there changes after ``index`` or the wait ends; ``None`` if the folder is empty."""
        params: dict[str, str | int] = {"keys": "", "wait": f"{wait_ms}ms"}
        if index:
            params["index"] = index
        response = await self.watch_client.request(
            "GET", f"/v1/kv/{folder}", params=params, wait_seconds=wait_ms / 1000, ok=(404,)
        )
        if response.status_code == 404:
            return None
        return int(response.headers.get("X-Consul-Index") or 0)

    async def delete_tree(self, folder: str) -> None:
        await self.client.request("DELETE", f"/v1/kv/{folder}", params={"recurse": ""})

    async def cleanup(self, folder: str) -> None:
        """Best effort, even while being cancelled; the janitor gets whatever stays."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(CLEANUP_SECONDS),
            contextlib.suppress(BackendError),
        ):
            await self.delete_tree(folder)

    async def leader(self) -> str:
        """The leader's address; empty while the cluster has none."""
        response = await self.client.request("GET", "/v1/status/leader")
        leader: str = response.json() or ""
        return leader

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.watch_client.aclose()
