"""The Consul KV store: each execution's record, state and tar in one KV folder.

Layout (``consul_keys`` has the key functions, ``docs/consul-layout.md`` the prose)::

    <prefix>/executions/<id>/status, record, manifest, upload, tar/NNNNNN, output/<rev>/...

How the guarantees are met:

- **All or nothing.** Every write is a ``/v1/txn``. A tar that fits one transaction
  (64 ops, 512 KiB of body on Consul 1.8) goes in one, with its record. A larger one
  first takes a claim (``upload``, created with check-not-exists), streams its chunks
  in further transactions that each check the claim, and commits ``manifest`` +
  ``record`` + ``status`` in a last one. Readers look at ``record``/``manifest`` only,
  so they never see half a bundle; a failed upload is deleted on the way out, and
  what a crash leaves (a claim, some chunks) is an incomplete leftover that
  ``list_expired`` reports once it is older than the TTL.
- **State changes** are check-and-set on the record's ModifyIndex, retried while the
  transition stays legal (``check_transition``), so two replicas racing from
  ``pending`` get exactly one winner and a terminal record never changes.
- **Waiting** is a Consul blocking query on ``status`` per waiter: a coroutine on an
  httpx connection of a separate pool (``max_watches``), never a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Collection, Iterator
from datetime import UTC, datetime
from typing import Any, BinaryIO

import anyio
import attrs
import consul.base
import consul.callback
import httpx
from anyio import to_thread

from pyexec.errors import BackendError, BackendUnavailable, Conflict, NotFound, PayloadTooLarge
from pyexec.models import TERMINAL, Execution, Status, utcnow
from pyexec.settings import Settings
from pyexec.store import CHUNK_SIZE, check_transition
from pyexec.store.consul_http import AsyncConsul
from pyexec.store.consul_keys import (
    INLINE_OUTPUT_BYTES,
    STREAMS,
    Manifest,
    UploadClaim,
    execution_folder,
    executions_root,
    id_from_folder,
    manifest_key,
    output_chunk_key,
    output_folder,
    record_key,
    status_key,
    tar_chunk_key,
    upload_key,
)

__all__ = ["COMMIT_OPS", "MAX_TXN_BYTES", "MAX_TXN_OPS", "ConsulStore"]

#: Operations per transaction Consul 1.8 accepts (1.14 and later: 128).
MAX_TXN_OPS = 64
#: Body bytes per transaction (``txn_max_req_len``); values travel base64 inside it.
MAX_TXN_BYTES = 512 * 1024
#: Operations of the last transaction of an upload besides its chunks: two checks (or
#: check + claim delete), manifest, record, status.
COMMIT_OPS = 5
#: A record is one KV value; keep it well below the 512 KiB value cap.
MAX_RECORD_BYTES = 256 * 1024
#: How often ``update`` re-reads and retries when another writer got in between.
CAS_ATTEMPTS = 16
#: Seconds the best-effort cleanup after a failed write may take.
CLEANUP_SECONDS = 5.0
#: Longest single blocking query (Consul caps ``wait`` at 10 minutes).
MAX_BLOCK_SECONDS = 300.0


def _op(verb: str, key: str, value: bytes | None = None, index: int | None = None) -> str:
    """One txn operation, serialised once (its length counts against the body budget)."""
    kv: dict[str, Any] = {"Verb": verb, "Key": key}
    if value is not None:
        kv["Value"] = base64.b64encode(value).decode("ascii")
    if index is not None:
        kv["Index"] = index
    return json.dumps({"KV": kv}, separators=(",", ":"))


@attrs.define
class _Batch:
    """Operations for one transaction, within the op and body limits."""

    max_ops: int
    max_bytes: int
    ops: list[str] = attrs.field(factory=list)
    size: int = 2  # the brackets

    def fits(self, *ops: str) -> bool:
        extra = sum(len(op) + 1 for op in ops)
        return len(self.ops) + len(ops) <= self.max_ops and self.size + extra <= self.max_bytes

    def add(self, *ops: str) -> None:
        self.ops.extend(ops)
        self.size += sum(len(op) + 1 for op in ops)


@attrs.frozen
class _TxnResult:
    ok: bool
    entries: list[dict[str, Any]]
    failed_ops: frozenset[int]


def _txn_answer(response: consul.base.Response) -> _TxnResult:
    if response.code == 409:
        errors = json.loads(response.body).get("Errors") or []
        return _TxnResult(False, [], frozenset(int(e.get("OpIndex", -1)) for e in errors))
    consul.callback.CB._status(response)
    results = json.loads(response.body).get("Results") or []
    return _TxnResult(True, [r["KV"] for r in results if "KV" in r], frozenset())


def _raw_answer(response: consul.base.Response) -> bytes | None:
    if response.code == 404:
        return None
    consul.callback.CB._status(response)
    body: bytes = response.body
    return body


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class ConsulStore:
    def __init__(
        self,
        client: AsyncConsul,
        watch_client: AsyncConsul,
        *,
        prefix: str = "pyexec",
        max_tar_bytes: int = 256 * 1024 * 1024,
        chunk_size: int = CHUNK_SIZE,
        max_txn_ops: int = MAX_TXN_OPS,
        max_txn_bytes: int = MAX_TXN_BYTES,
    ) -> None:
        if not prefix.strip("/"):
            raise ValueError("the Consul prefix must not be empty")
        self._consul = client
        self._watch = watch_client
        self._prefix = prefix.strip("/")
        self._max_tar_bytes = max_tar_bytes
        self._chunk_size = chunk_size
        self._max_ops = max_txn_ops
        self._max_bytes = max_txn_bytes
        self._closed = False
        # One chunk, base64 in a txn body, must fit beside a claim check.
        if 4 * -(-chunk_size // 3) + 1024 > max_txn_bytes or max_txn_ops < COMMIT_OPS + 1:
            raise ValueError("chunk_size does not fit a transaction")

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 32,
        max_watches: int = 128,
        **options: Any,
    ) -> ConsulStore:
        """The store ``settings`` describe. Opens no connection yet (``ping`` checks).

        ``max_connections + max_watches`` stays below Consul's default
        ``http_max_conns_per_client`` (200).
        """
        client = AsyncConsul.from_settings(
            settings, max_connections=max_connections, transport=transport
        )
        watch = AsyncConsul.from_settings(
            settings, max_connections=max_watches, transport=transport
        )
        return cls(
            client,
            watch,
            prefix=settings.consul_prefix,
            max_tar_bytes=settings.max_tar_bytes,
            **options,
        )

    @property
    def prefix(self) -> str:
        return self._prefix

    # --- Low-level calls ------------------------------------------------------------------

    def _new_batch(self) -> _Batch:
        return _Batch(self._max_ops, self._max_bytes)

    async def _txn(self, ops: list[str]) -> _TxnResult:
        if len(ops) > self._max_ops:
            raise BackendError(f"transaction of {len(ops)} ops planned", code="store_error")
        body = "[" + ",".join(ops) + "]"
        result: _TxnResult = await self._consul.http.put(_txn_answer, "/v1/txn", data=body)
        return result

    async def _get(self, key: str) -> tuple[int, dict[str, Any] | None]:
        index, item = await self._consul.kv.get(key)
        return int(index), item

    async def _get_raw(self, key: str) -> bytes | None:
        data: bytes | None = await self._consul.http.get(
            _raw_answer, f"/v1/kv/{key}", params=[("raw", "1")], raw=True
        )
        return data

    async def _delete_tree(self, folder: str) -> None:
        await self._consul.kv.delete(folder, recurse=True)

    async def _cleanup(self, folder: str) -> None:
        """Best effort, even while being cancelled: the janitor gets whatever stays."""
        with (
            anyio.CancelScope(shield=True),
            anyio.move_on_after(CLEANUP_SECONDS),
            contextlib.suppress(BackendError),
        ):
            await self._delete_tree(folder)

    async def _write_all(self, ops: list[str], guard: list[str]) -> None:
        """Write ``ops`` in as many transactions as the limits need, each led by ``guard``."""
        batch = self._new_batch()
        batch.add(*guard)
        for op in ops:
            if not batch.fits(op):
                await self._commit(batch.ops)
                batch = self._new_batch()
                batch.add(*guard)
            batch.add(op)
        if len(batch.ops) > len(guard):
            await self._commit(batch.ops)

    async def _commit(self, ops: list[str]) -> _TxnResult:
        result = await self._txn(ops)
        if not result.ok:
            raise Conflict("a concurrent change got in the way", code="invalid_transition")
        return result

    # --- Records -------------------------------------------------------------------------

    def _encode(self, record: Execution, rev: str) -> tuple[bytes, list[tuple[str, bytes]]]:
        """Record JSON (output moved out when large) and the output chunks to write."""
        body = record.to_dict(include_request=True)
        chunks: list[tuple[str, bytes]] = []
        output: dict[str, Any] = {}
        for stream in STREAMS:
            data = body[stream].encode("utf-8")
            if len(data) <= INLINE_OUTPUT_BYTES:
                continue
            body[stream] = ""
            pieces = list(_pieces(data, self._chunk_size))
            output[stream] = {"chunks": len(pieces), "size": len(data)}
            chunks += [
                (output_chunk_key(self._prefix, record.execution_id, rev, stream, i), piece)
                for i, piece in enumerate(pieces)
            ]
        if output:
            body["output"] = {"rev": rev, **output}
        raw = json.dumps(body, ensure_ascii=False, indent=1).encode("utf-8")
        if len(raw) > MAX_RECORD_BYTES:
            raise PayloadTooLarge(
                f"the execution record is {len(raw)} bytes; at most {MAX_RECORD_BYTES} fit",
                code="record_too_large",
            )
        return raw, chunks

    async def _decode(self, execution_id: str, raw: bytes) -> Execution:
        data = json.loads(raw)
        output = data.pop("output", None) or {}
        for stream in STREAMS:
            info = output.get(stream)
            if info is None:
                continue
            parts = []
            for i in range(int(info["chunks"])):
                key = output_chunk_key(self._prefix, execution_id, output["rev"], stream, i)
                piece = await self._get_raw(key)
                if piece is None:
                    raise _OutputMoved
                parts.append(piece)
            blob = b"".join(parts)
            if len(blob) != int(info["size"]):
                raise BackendError(f"{stream} of {execution_id} is damaged", code="store_error")
            data[stream] = blob.decode("utf-8", errors="replace")
        return Execution.from_dict(data)

    async def _read(self, execution_id: str) -> tuple[Execution, int, str | None]:
        """The record, its ModifyIndex and its output revision; ``NotFound`` if none."""
        for _ in range(CAS_ATTEMPTS):
            _, item = await self._get(record_key(self._prefix, execution_id))
            if item is None or item.get("Value") is None:
                raise NotFound(f"no execution {execution_id}")
            raw: bytes = item["Value"]
            try:
                record = await self._decode(execution_id, raw)
            except _OutputMoved:
                continue  # an update replaced the output between our reads; read again
            rev = (json.loads(raw).get("output") or {}).get("rev")
            return record, int(item["ModifyIndex"]), rev
        raise BackendUnavailable(
            f"execution {execution_id} keeps changing", code="store_unavailable"
        )

    async def get(self, execution_id: str) -> Execution:
        record, _, _ = await self._read(execution_id)
        return record

    async def create(self, record: Execution, tar: BinaryIO) -> None:
        eid = record.execution_id
        raw, output_chunks = self._encode(record, secrets.token_hex(4))
        folder = execution_folder(self._prefix, eid)
        rkey, ukey = record_key(self._prefix, eid), upload_key(self._prefix, eid)
        status_op = _op("set", status_key(self._prefix, eid), record.status.value.encode())
        record_op = _op("cas", rkey, raw, index=0)
        widest = Manifest(chunks=999_999, size=10**15, sha256="0" * 64, chunk_size=10**9)
        reserve = [
            _op("check-index", ukey, index=10**18),
            _op("delete", ukey),
            _op("set", manifest_key(self._prefix, eid), widest.to_json().encode()),
            record_op,
            status_op,
        ]
        assert len(reserve) == COMMIT_OPS
        claim = UploadClaim(started_at=_iso(utcnow()), owner=secrets.token_hex(8))
        claim_index: int | None = None
        hasher, size, count = hashlib.sha256(), 0, 0
        pending = self._new_batch()

        async def flush() -> None:
            # Chunks that no longer fit beside the commit ops go ahead, under the claim.
            nonlocal claim_index, pending
            if claim_index is None:
                guard = [
                    _op("check-not-exists", rkey),
                    _op("cas", ukey, claim.to_json().encode(), 0),
                ]
            else:
                guard = [_op("check-index", ukey, index=claim_index)]
            result = await self._txn(guard + pending.ops)
            if not result.ok:
                if claim_index is None:
                    raise Conflict(f"execution {eid} exists", code="already_exists")
                raise BackendError(f"the upload of {eid} was removed meanwhile", code="store_error")
            if claim_index is None:
                claim_index = next(
                    int(e["ModifyIndex"]) for e in result.entries if e["Key"] == ukey
                )
            pending = self._new_batch()

        async def add(op: str) -> None:
            if pending.fits(op, *reserve):
                pending.add(op)
                return
            if pending.ops or claim_index is None:
                await flush()
            pending.add(op)
            if not pending.fits(*reserve):
                await flush()  # this chunk cannot share a transaction with the commit

        try:
            for key, piece in output_chunks:
                await add(_op("set", key, piece))
            while chunk := await to_thread.run_sync(tar.read, self._chunk_size):
                size += len(chunk)
                if size > self._max_tar_bytes:
                    raise PayloadTooLarge(
                        f"the tar is larger than {self._max_tar_bytes} bytes",
                        code="tar_too_large",
                        maximum=self._max_tar_bytes,
                    )
                hasher.update(chunk)
                await add(_op("set", tar_chunk_key(self._prefix, eid, count), chunk))
                count += 1
            manifest = Manifest(
                chunks=count, size=size, sha256=hasher.hexdigest(), chunk_size=self._chunk_size
            )
            commit = [_op("set", manifest_key(self._prefix, eid), manifest.to_json().encode())]
            commit += [record_op, status_op]
            if claim_index is None:
                lead = [_op("check-not-exists", rkey), _op("check-not-exists", ukey)]
                result = await self._txn(lead + pending.ops + commit)
                if not result.ok:
                    raise Conflict(f"execution {eid} exists", code="already_exists")
                return
            lead = [_op("check-index", ukey, index=claim_index)]
            result = await self._txn(lead + pending.ops + commit + [_op("delete", ukey)])
            if not result.ok:
                raise BackendError(f"the upload of {eid} was removed meanwhile", code="store_error")
        except BaseException:
            if claim_index is not None:
                await self._cleanup(folder)
            raise

    async def update(self, record: Execution, *, expect: Collection[Status]) -> Execution:
        eid = record.execution_id
        rev = secrets.token_hex(4)
        raw, output_chunks = self._encode(record, rev)
        rkey = record_key(self._prefix, eid)
        chunk_ops = [_op("set", key, piece) for key, piece in output_chunks]
        written = False
        try:
            for _ in range(CAS_ATTEMPTS):
                current, index, old_rev = await self._read(eid)
                check_transition(current, record, expect)
                ops = [
                    _op("cas", rkey, raw, index=index),
                    _op("set", status_key(self._prefix, eid), record.status.value.encode()),
                ]
                if old_rev is not None:
                    ops.append(_op("delete-tree", output_folder(self._prefix, eid, old_rev)))
                batch = self._new_batch()
                batch.add(*ops)
                if chunk_ops and not written:
                    if batch.fits(*chunk_ops):
                        batch.add(*chunk_ops)
                    else:
                        # Too big for one transaction: the chunks go first, under a fresh
                        # revision nobody reads until the record below points at it.
                        await self._write_all(chunk_ops, guard=[])
                        written = True
                if (await self._txn(batch.ops)).ok:
                    written = False
                    return record
            raise Conflict(f"execution {eid} changed too often", code="invalid_transition")
        finally:
            if written:
                await self._cleanup(output_folder(self._prefix, eid, rev))

    # --- Tars -----------------------------------------------------------------------------

    async def open_tar(self, execution_id: str) -> AsyncIterator[bytes]:
        _, item = await self._get(manifest_key(self._prefix, execution_id))
        if item is None or item.get("Value") is None:
            await self.get(execution_id)  # NotFound(execution_not_found) when all is gone
            raise NotFound(f"the tar of {execution_id} is gone", code="tar_not_found")
        manifest = Manifest.from_json(item["Value"])
        hasher, total = hashlib.sha256(), 0
        for i in range(manifest.chunks):
            chunk = await self._get_raw(tar_chunk_key(self._prefix, execution_id, i))
            if chunk is None:
                _, still = await self._get(manifest_key(self._prefix, execution_id))
                if still is None:
                    raise NotFound(f"the tar of {execution_id} is gone", code="tar_not_found")
                raise BackendError(
                    f"chunk {i} of the tar of {execution_id} is missing", code="store_error"
                )
            last = i == manifest.chunks - 1
            if len(chunk) > manifest.chunk_size or (not last and len(chunk) != manifest.chunk_size):
                raise BackendError(
                    f"chunk {i} of the tar of {execution_id} has a wrong size", code="store_error"
                )
            total += len(chunk)
            hasher.update(chunk)
            yield chunk
        if total != manifest.size or hasher.hexdigest() != manifest.sha256:
            raise BackendError(
                f"the tar of {execution_id} does not match its manifest", code="store_error"
            )

    # --- Cleanup and listing ------------------------------------------------------------

    async def delete(self, execution_id: str) -> None:
        await self._delete_tree(execution_folder(self._prefix, execution_id))

    async def _ids(self) -> list[str]:
        _, keys = await self._consul.kv.get(executions_root(self._prefix), keys=True, separator="/")
        ids = (id_from_folder(self._prefix, key) for key in keys or ())
        return [eid for eid in ids if eid is not None]

    async def _heads(self) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Per execution folder: its record and its upload claim (raw), read atomically."""
        heads: dict[str, tuple[bytes | None, bytes | None]] = {}
        ids = await self._ids()
        step = self._max_ops // 2
        for start in range(0, len(ids), step):
            batch = ids[start : start + step]
            ops = []
            for eid in batch:
                ops += [
                    _op("get-tree", record_key(self._prefix, eid)),
                    _op("get-tree", upload_key(self._prefix, eid)),
                ]
            result = await self._txn(ops)
            values = {e["Key"]: base64.b64decode(e["Value"] or "") for e in result.entries}
            for eid in batch:
                heads[eid] = (
                    values.get(record_key(self._prefix, eid)),
                    values.get(upload_key(self._prefix, eid)),
                )
        return heads

    async def list_expired(self, now: datetime, ttl: float) -> list[str]:
        expired = []
        for eid, (raw, claim) in (await self._heads()).items():
            if raw is not None:
                data = json.loads(raw)
                data.pop("output", None)
                record = Execution.from_dict(data)
                ended = record.finished_at or record.created_at
                if record.terminal and (now - ended).total_seconds() > ttl:
                    expired.append(eid)
            elif claim is not None:
                started = datetime.fromisoformat(
                    UploadClaim.from_json(claim).started_at.replace("Z", "+00:00")
                )
                if (now - started).total_seconds() > ttl:
                    expired.append(eid)
            else:
                expired.append(eid)  # neither claim nor record: debris of a removal
        return expired

    async def list_active(self) -> list[Execution]:
        active = []
        for eid, (raw, _) in (await self._heads()).items():
            if raw is None or Status(json.loads(raw)["status"]) in TERMINAL:
                continue
            try:
                active.append(await self.get(eid))
            except NotFound:
                continue  # deleted since the listing
        return active

    # --- Waiting --------------------------------------------------------------------------

    async def wait_terminal(self, execution_id: str, timeout: float) -> Execution:
        deadline = anyio.current_time() + max(0.0, timeout)
        record = await self.get(execution_id)
        key = status_key(self._prefix, execution_id)
        index = 0
        while not record.terminal:
            remaining = deadline - anyio.current_time()
            if remaining <= 0:
                break
            wait_ms = max(1, int(min(remaining, MAX_BLOCK_SECONDS) * 1000))
            new_index, item = None, None
            with anyio.move_on_after(remaining):
                new_index, item = await self._watch.kv.get(
                    key, index=index or None, wait=f"{wait_ms}ms"
                )
            if new_index is None:  # the deadline cancelled the query
                break
            if item is None:
                raise NotFound(f"no execution {execution_id}")
            new_index = int(new_index)
            # An index that goes backwards (snapshot restore, leader change) starts over.
            index = 0 if new_index < index else new_index
            if Status((item["Value"] or b"").decode() or "pending") in TERMINAL:
                record = await self.get(execution_id)
        if record.terminal:
            return record
        return await self.get(execution_id)

    # --- Health -------------------------------------------------------------------------

    async def ping(self) -> None:
        leader = await self._consul.status.leader()
        if not leader:
            raise BackendUnavailable("Consul has no leader", code="store_unavailable")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._consul.http.close()
        await self._watch.http.close()


class _OutputMoved(Exception):
    """An output chunk vanished between reading the record and reading the chunk."""
