"""The Consul KV store: each execution's record, state and tar in one KV folder.

Layout (``consul_keys`` has the key functions, ``docs/consul-layout.md`` the prose)::

    <prefix>/executions/<id>/status, status=<status>, record, manifest, upload, tar/NNNNNN,
    output/<rev>/..., live/... (``consul_live``)

How the guarantees are met:

- **All or nothing.** A new execution is written so that ``record`` and ``manifest``
  (the completion marker) appear in the same, last transaction; see ``consul_upload``.
  A failed upload is deleted on the way out; what a crash leaves is an incomplete
  leftover (a claim, some chunks, no record) that readers never see and
  ``list_expired`` reports once it is older than the TTL.
- **State changes** (``transition``) are check-and-set on the record's ModifyIndex,
  the change re-applied to a fresh read while it stays legal (``apply_change``), so two
  replicas racing from ``pending`` get exactly one winner and a terminal record never
  changes. The store remembers the ModifyIndex of the records it wrote last, so a
  change to a record nobody else touched is one transaction, no read.
- **Large output** goes to ``output/<rev>/`` chunks written before the record that
  points at them, under a fresh revision, so a losing writer never overwrites the
  winner's output; the winner's transaction deletes the previous revision.
- **Waiting** is a Consul blocking query on ``status`` per waiter: a coroutine on an
  httpx connection of a separate pool (``max_watches``), never a worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from datetime import datetime
from typing import Any, BinaryIO

import anyio
import httpx

from pyexec.errors import (
    BackendError,
    BackendUnavailable,
    Conflict,
    IdempotentReplay,
    NotFound,
    PayloadTooLarge,
)
from pyexec.models import TERMINAL, Execution, Status, callback_outstanding
from pyexec.settings import Settings
from pyexec.store import CHUNK_SIZE, Change, LiveOutput, OutputChunk, apply_change, consul_live
from pyexec.store.consul_http import ConsulHTTP
from pyexec.store.consul_keys import (
    INLINE_OUTPUT_BYTES,
    STREAMS,
    Manifest,
    UploadClaim,
    artifacts_chunk_key,
    artifacts_folder,
    artifacts_manifest_key,
    execution_folder,
    executions_root,
    id_from_folder,
    idempotency_key,
    live_folder,
    manifest_key,
    output_chunk_key,
    output_folder,
    record_key,
    status_key,
    status_marker_key,
    tar_chunk_key,
    upload_key,
)
from pyexec.store.consul_kv import MAX_TXN_BYTES, MAX_TXN_OPS, ConsulKV, kv_op
from pyexec.store.consul_upload import COMMIT_OPS, upload

__all__ = ["COMMIT_OPS", "MAX_TXN_BYTES", "MAX_TXN_OPS", "ConsulStore"]

#: A record is one KV value (at most 512 KiB) and must fit a transaction base64-encoded.
MAX_RECORD_BYTES = 256 * 1024
#: Largest chunk: Consul's default cap on one value.
MAX_CHUNK_SIZE = 512 * 1024
#: How often ``transition`` re-reads and retries when another writer got in between.
CAS_ATTEMPTS = 16
#: Records whose last write (by this store) is remembered: ModifyIndex and output rev.
KNOWN_RECORDS = 1024
#: Longest single blocking query (Consul caps ``wait`` at 10 minutes).
MAX_BLOCK_SECONDS = 300.0


_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class ConsulStore:
    def __init__(
        self,
        kv: ConsulKV,
        *,
        prefix: str = "pyexec",
        max_tar_bytes: int = 256 * 1024 * 1024,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if not prefix.strip("/"):
            raise ValueError("the Consul prefix must not be empty")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE or kv.max_txn_ops < COMMIT_OPS + 2:
            raise ValueError("chunk_size or the transaction limits are out of range")
        self._kv = kv
        self._prefix = prefix.strip("/")
        self._live = consul_live.LiveWriter(kv, self._prefix)
        self._max_tar_bytes = max_tar_bytes
        self._chunk_size = chunk_size
        self._closed = False
        #: id -> (record, ModifyIndex, output revision) as this store last wrote it.
        self._known: OrderedDict[str, tuple[Execution, int, str | None]] = OrderedDict()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 32,
        max_watches: int = 128,
        max_txn_ops: int = MAX_TXN_OPS,
        max_txn_bytes: int = MAX_TXN_BYTES,
        chunk_size: int = CHUNK_SIZE,
    ) -> ConsulStore:
        """The store ``settings`` describe. Opens no connection yet (``ping`` checks).

        Blocking queries get their own pool of ``max_watches`` connections so parked
        waiters never starve uploads; both pools together stay below Consul's default
        ``http_max_conns_per_client`` (200).
        """

        def client(connections: int) -> ConsulHTTP:
            return ConsulHTTP.from_settings(
                settings, max_connections=connections, transport=transport
            )

        kv = ConsulKV(
            client(max_connections),
            client(max_watches),
            max_txn_ops=max_txn_ops,
            max_txn_bytes=max_txn_bytes,
        )
        return cls(
            kv,
            prefix=settings.consul_prefix,
            max_tar_bytes=settings.max_tar_bytes,
            chunk_size=chunk_size,
        )

    @property
    def prefix(self) -> str:
        return self._prefix

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
                piece = await self._kv.get_raw(key)
                if piece is None:
                    raise _OutputMoved
                parts.append(piece)
            blob = b"".join(parts)
            if len(blob) != int(info["size"]):
                raise BackendError(f"{stream} of {execution_id} is damaged", code="store_error")
            data[stream] = blob.decode("utf-8", errors="replace")
        return Execution.from_dict(data)

    async def _current(self, execution_id: str) -> tuple[Execution, int, str | None]:
        """The whole record, output included, its ModifyIndex and output revision;
        ``NotFound`` if none."""
        for _ in range(CAS_ATTEMPTS):
            item = await self._kv.get(record_key(self._prefix, execution_id))
            if item is None or item.get("Value") is None:
                raise NotFound(f"no execution {execution_id}")
            raw: bytes = item["Value"]
            rev = (json.loads(raw).get("output") or {}).get("rev")
            try:
                return await self._decode(execution_id, raw), int(item["ModifyIndex"]), rev
            except _OutputMoved:
                continue  # a change replaced the output between our reads; read again
        raise BackendUnavailable(
            f"execution {execution_id} keeps changing", code="store_unavailable"
        )

    def _remember(self, record: Execution, index: int | None, rev: str | None) -> None:
        if index is None:  # not known: the next change reads first
            self._known.pop(record.execution_id, None)
            return
        self._known[record.execution_id] = (record, index, rev)
        self._known.move_to_end(record.execution_id)
        while len(self._known) > KNOWN_RECORDS:
            self._known.popitem(last=False)

    async def _head(self, execution_id: str) -> tuple[Execution, int, str | None]:
        """The record without its chunked output (enough to check a transition), its
        ModifyIndex and its output revision; ``NotFound`` if none."""
        item = await self._kv.get(record_key(self._prefix, execution_id))
        if item is None or item.get("Value") is None:
            raise NotFound(f"no execution {execution_id}")
        data = json.loads(item["Value"])
        rev = (data.pop("output", None) or {}).get("rev")
        return Execution.from_dict(data), int(item["ModifyIndex"]), rev

    async def get(self, execution_id: str) -> Execution:
        record, _, _ = await self._current(execution_id)
        return record

    async def create(self, record: Execution, tar: BinaryIO | None) -> None:
        rev = secrets.token_hex(4)
        raw, output_chunks = self._encode(record, rev)
        unique = None
        if record.idempotency is not None:
            holder = {"execution_id": record.execution_id, **record.idempotency.to_dict()}
            unique = (
                idempotency_key(self._prefix, record.idempotency.key),
                json.dumps(holder).encode(),
            )
        try:
            index = await upload(
                self._kv,
                self._prefix,
                record.execution_id,
                record=raw,
                status=record.status.value,
                extra_chunks=output_chunks,
                tar=tar,
                chunk_size=self._chunk_size,
                max_tar_bytes=self._max_tar_bytes,
                unique=unique,
            )
        except Conflict:
            if unique is not None:
                item = await self._kv.get(unique[0])
                if item is not None and item.get("Value") is not None:
                    holder = json.loads(item["Value"])
                    raise IdempotentReplay(
                        execution_id=str(holder["execution_id"]),
                        fingerprint=str(holder["fingerprint"]),
                    ) from None
            raise
        self._remember(record, index, rev if output_chunks else None)

    async def transition(
        self, execution_id: str, change: Change, *, expect: Collection[Status]
    ) -> Execution:
        known = self._known.pop(execution_id, None)
        for _ in range(CAS_ATTEMPTS):
            # What this store wrote last is tried first: if nobody wrote since, the
            # check-and-set passes without a read; if somebody did, it fails and we read.
            current, index, old_rev = known or await self._current(execution_id)
            known = None
            record = apply_change(current, change, expect)
            if record == current:
                self._remember(current, index, old_rev)
                return current
            # Once the run is over nothing needs its tar (if one was stored): free it in
            # the same transaction. Not earlier: the Nomad client renders the tar into the
            # run task from these keys, and a delete while the task starts would re-render
            # it empty under the task's feet.
            free_tar = record.terminal and not current.terminal
            stored = await self._write(
                record, index, old_rev, free_tar=free_tar, old_status=current.status
            )
            if stored is not None:
                self._remember(record, *stored)
                if record.terminal:
                    self._live.forget(execution_id)  # its live output was deleted with it
                return record
        raise Conflict(f"execution {execution_id} changed too often", code="invalid_transition")

    async def _write(
        self,
        record: Execution,
        index: int,
        old_rev: str | None,
        *,
        free_tar: bool,
        old_status: Status,
    ) -> tuple[int | None, str | None] | None:
        """Check-and-set ``record`` over the version at ``index`` (deleting the tar if
        ``free_tar``): its new ModifyIndex and output revision, or ``None`` if somebody
        else wrote first."""
        eid = record.execution_id
        rev = secrets.token_hex(4)
        raw, output_chunks = self._encode(record, rev)
        rkey = record_key(self._prefix, eid)
        batch = self._kv.batch()
        batch.add(
            kv_op("cas", rkey, raw, index=index),
            kv_op("set", status_key(self._prefix, eid), record.status.value.encode()),
        )
        if record.status is not old_status:
            batch.add(
                kv_op("delete", status_marker_key(self._prefix, eid, old_status.value)),
                kv_op("set", status_marker_key(self._prefix, eid, record.status.value), b""),
            )
        if old_rev is not None:
            batch.add(kv_op("delete-tree", output_folder(self._prefix, eid, old_rev)))
        if free_tar:
            batch.add(
                kv_op("delete", manifest_key(self._prefix, eid)),
                kv_op("delete-tree", execution_folder(self._prefix, eid) + "tar/"),
                # The record holds the output from now on: the live output goes too.
                kv_op("delete-tree", live_folder(self._prefix, eid)),
            )
        # Output that fits rides in the record's transaction (base64); more goes first, as
        # raw create-only PUTs under the fresh revision nobody reads until the record
        # written below points at it.
        inline = sum(len(piece) for _, piece in output_chunks) <= self._kv.max_txn_bytes // 2
        chunk_ops = [kv_op("set", key, piece) for key, piece in output_chunks] if inline else []
        written = False
        try:
            if chunk_ops and batch.fits(*chunk_ops):
                batch.add(*chunk_ops)
            elif output_chunks:
                written = True  # from the first PUT on, a failure must clean up
                for key, piece in output_chunks:
                    if not await self._kv.put_new(key, piece):
                        raise BackendError(f"{key} exists already", code="store_error")
            result = await self._kv.txn(batch.ops)
            if result.ok:
                written = False
                if record.status is Status.RUNNING and old_status is not Status.RUNNING:
                    # It has no live output yet: its first flush need not read.
                    status_index = result.modify_index(status_key(self._prefix, eid))
                    self._live.begin(eid, status_index)
                return result.modify_index(rkey), rev if output_chunks else None
            return None
        finally:
            if written:
                await self._kv.cleanup(output_folder(self._prefix, eid, rev))

    # --- Tars -----------------------------------------------------------------------------

    async def open_tar(self, execution_id: str) -> AsyncIterator[bytes]:
        item = await self._kv.get(manifest_key(self._prefix, execution_id))
        if item is None or item.get("Value") is None:
            await self.get(execution_id)  # NotFound(execution_not_found) when all is gone
            raise NotFound(f"the tar of {execution_id} is gone", code="tar_not_found")
        manifest = Manifest.from_json(item["Value"])
        hasher, total = hashlib.sha256(), 0
        for i in range(manifest.chunks):
            chunk = await self._kv.get_raw(tar_chunk_key(self._prefix, execution_id, i))
            if chunk is None:
                still = await self._kv.get(manifest_key(self._prefix, execution_id))
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
        self._known.pop(execution_id, None)
        try:
            record, _, _ = await self._head(execution_id)
        except NotFound:
            record = None  # gone, or a leftover upload (which never holds a key)
        if record is not None and record.idempotency is not None:
            # The key expires with its record: deleted in the same transaction, and only
            # while it still names this execution.
            key = idempotency_key(self._prefix, record.idempotency.key)
            item = await self._kv.get(key)
            if item is not None and item.get("Value") is not None:
                holder = json.loads(item["Value"])
                if holder.get("execution_id") == execution_id:
                    ops = [
                        kv_op("delete-cas", key, index=int(item["ModifyIndex"])),
                        kv_op("delete-tree", execution_folder(self._prefix, execution_id)),
                    ]
                    if (await self._kv.txn(ops)).ok:
                        return
        await self._kv.delete_tree(execution_folder(self._prefix, execution_id))

    async def _ids(self) -> list[str]:
        keys = await self._kv.folders(executions_root(self._prefix))
        ids = (id_from_folder(self._prefix, key) for key in keys)
        return [eid for eid in ids if eid is not None]

    async def _heads(self) -> dict[str, tuple[bytes | None, bytes | None]]:
        """Per execution folder: its record and its upload claim (raw), read atomically."""
        heads: dict[str, tuple[bytes | None, bytes | None]] = {}
        ids = await self._ids()
        step = self._kv.max_txn_ops // 2
        for start in range(0, len(ids), step):
            batch = ids[start : start + step]
            ops = []
            for eid in batch:
                ops += [
                    kv_op("get-tree", record_key(self._prefix, eid)),
                    kv_op("get-tree", upload_key(self._prefix, eid)),
                ]
            result = await self._kv.txn(ops)
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

    async def list_callbacks_outstanding(self) -> list[Execution]:
        outstanding = []
        for raw, _ in (await self._heads()).values():
            if raw is None:
                continue
            data = json.loads(raw)
            data.pop("output", None)  # the head is enough to decide, and to deliver from below
            if callback_outstanding(Execution.from_dict(data)):
                try:
                    outstanding.append(await self.get(data["execution_id"]))
                except NotFound:
                    continue  # deleted since the listing
        return outstanding

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
            answer: tuple[int, bytes | None] | None = None
            with anyio.move_on_after(remaining):
                answer = await self._kv.block(key, index, wait_ms)
            if answer is None:  # the deadline cancelled the query
                break
            new_index, status = answer
            if status is None:
                raise NotFound(f"no execution {execution_id}")
            # An index that goes backwards (snapshot restore, leader change) starts over.
            index = 0 if new_index < index else new_index
            if status.decode(errors="replace") in _TERMINAL_VALUES:
                record = await self.get(execution_id)
        if record.terminal:
            return record
        return await self.get(execution_id)

    # --- Health -------------------------------------------------------------------------

    async def ping(self) -> None:
        leader = await self._kv.leader()
        if not leader:
            raise BackendUnavailable("Consul has no leader", code="store_unavailable")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._kv.aclose()

    # --- Live output (``consul_live``) --------------------------------------------------

    async def append_output(self, execution_id: str, chunks: Sequence[OutputChunk]) -> None:
        await self._live.append(execution_id, chunks)

    async def read_output(self, execution_id: str, stream: str, offset: int, limit: int) -> bytes:
        return await consul_live.read(self._kv, self._prefix, execution_id, stream, offset, limit)

    async def watch_output(self, execution_id: str, version: int, timeout: float) -> LiveOutput:
        return await consul_live.watch(self._kv, self._prefix, execution_id, version, timeout)

    # --- Artifacts ----------------------------------------------------------------------

    async def put_artifacts(self, execution_id: str, blob: BinaryIO) -> None:
        """Chunks first (create-only raw PUTs), the manifest last: a blob exists when, and
        only when, its manifest does. A failure removes what was written."""
        kv, prefix = self._kv, self._prefix
        await self.get(execution_id)
        await kv.delete_tree(artifacts_folder(prefix, execution_id))
        hasher, size, count = hashlib.sha256(), 0, 0
        try:
            while chunk := await anyio.to_thread.run_sync(blob.read, self._chunk_size):
                hasher.update(chunk)
                size += len(chunk)
                key = artifacts_chunk_key(prefix, execution_id, count)
                if not await kv.put_new(key, chunk):
                    raise BackendError(f"{execution_id}: artifacts exist", code="store_error")
                count += 1
            manifest = Manifest(
                chunks=count, size=size, sha256=hasher.hexdigest(), chunk_size=self._chunk_size
            )
            key = artifacts_manifest_key(prefix, execution_id)
            if not await kv.put_new(key, manifest.to_json().encode()):
                raise BackendError(f"{execution_id}: artifacts exist", code="store_error")
        except BaseException:
            await kv.cleanup(artifacts_folder(prefix, execution_id))
            raise

    async def open_artifacts(
        self, execution_id: str, start: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        kv, prefix = self._kv, self._prefix
        item = await kv.get(artifacts_manifest_key(prefix, execution_id))
        if item is None or item.get("Value") is None:
            await self.get(execution_id)
            raise NotFound(f"{execution_id} has no artifacts", code="artifact_not_found")
        manifest = Manifest.from_json(item["Value"])
        end = manifest.size if length is None else min(manifest.size, start + length)
        whole = start == 0 and end == manifest.size
        hasher = hashlib.sha256()
        first = start // manifest.chunk_size
        for i in range(first, manifest.chunks):
            offset = i * manifest.chunk_size
            if offset >= end:
                break
            chunk = await kv.get_raw(artifacts_chunk_key(prefix, execution_id, i))
            if chunk is None:
                raise NotFound(f"{execution_id}: artifacts gone", code="artifact_not_found")
            if whole:
                hasher.update(chunk)
            yield chunk[max(0, start - offset) : end - offset]
        if whole and hasher.hexdigest() != manifest.sha256:
            raise BackendError(
                f"the artifacts of {execution_id} do not match their manifest", code="store_error"
            )


class _OutputMoved(Exception):
    """An output chunk vanished between reading the record and reading the chunk."""
