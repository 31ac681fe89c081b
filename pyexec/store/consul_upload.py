"""Writing a new execution to Consul so that readers see all of it or nothing.

A bundle that fits one transaction (record, status, manifest and every chunk within
64 ops and 512 KiB of base64 body) is written by that one transaction, guarded by
check-not-exists on ``record`` and ``upload``. A larger one goes in three steps:

1. a transaction that checks ``record`` does not exist and creates the ``upload``
   claim (cas index 0), carrying the first chunks;
2. every further chunk as a plain binary ``PUT ?cas=0`` (no base64 inflation; a
   chunk never overwrites another);
3. a last transaction that checks the claim is still ours (its ModifyIndex), then
   writes ``manifest``, ``record`` (cas 0) and ``status`` and deletes the claim.

Readers look only at ``record`` and ``manifest``, which appear together in the
last step. A ``unique`` key (a submit's idempotency key) is checked not to exist and
written in that same transaction, so two creates with one key cannot both succeed.
If anything fails after step 1 the folder is deleted (best effort, shielded from
cancellation); what a crash leaves is a folder with a claim and no
record, which ``list_expired`` reports once the claim is older than the TTL.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import UTC
from typing import BinaryIO

from anyio import to_thread

from pyexec.errors import BackendError, Conflict, PayloadTooLarge
from pyexec.models import utcnow
from pyexec.store.consul_keys import (
    Manifest,
    UploadClaim,
    execution_folder,
    manifest_key,
    record_key,
    status_key,
    status_marker_key,
    tar_chunk_key,
    upload_key,
)
from pyexec.store.consul_kv import ConsulKV, kv_op

__all__ = ["COMMIT_OPS", "upload"]

#: Operations of an upload's last transaction besides chunks: two checks (or a check
#: and the claim's delete), manifest, record, status and its marker; a ``unique`` key
#: adds two more.
COMMIT_OPS = 6
_WIDEST_MANIFEST = Manifest(chunks=999_999, size=10**15, sha256="0" * 64, chunk_size=10**9)


async def upload(
    kv: ConsulKV,
    prefix: str,
    execution_id: str,
    *,
    record: bytes,
    status: str,
    extra_chunks: Sequence[tuple[str, bytes]],
    tar: BinaryIO | None,
    chunk_size: int,
    max_tar_bytes: int,
    unique: tuple[str, bytes] | None = None,
) -> int | None:
    """Store a new execution: ``record`` JSON, ``status``, ``extra_chunks`` and the tar
    (``None``: no tar, no manifest), and ``unique`` (key, value), which must not exist yet.

    Returns the record's ModifyIndex (if Consul named it), so the next check-and-set
    needs no read first. Raises ``Conflict`` if the record or the unique key exists."""
    rkey, ukey = record_key(prefix, execution_id), upload_key(prefix, execution_id)
    mkey = manifest_key(prefix, execution_id)
    record_op = kv_op("cas", rkey, record, index=0)
    status_op = kv_op("set", status_key(prefix, execution_id), status.encode())
    marker_op = kv_op("set", status_marker_key(prefix, execution_id, status), b"")
    unique_ops = (
        [kv_op("check-not-exists", unique[0]), kv_op("set", unique[0], unique[1])]
        if unique is not None
        else []
    )
    # What the last transaction adds to the chunks it carries, at its widest.
    reserve = [
        kv_op("check-index", ukey, index=2**63),
        kv_op("delete", ukey),
        kv_op("set", mkey, _WIDEST_MANIFEST.to_json().encode()),
        record_op,
        status_op,
        marker_op,
        *unique_ops,
    ]
    pending = kv.batch()
    claim_index: int | None = None

    async def take_claim() -> int:
        claim = UploadClaim(
            started_at=utcnow().astimezone(UTC).isoformat().replace("+00:00", "Z"),
            owner=secrets.token_hex(8),
        )
        ops = [kv_op("check-not-exists", rkey), kv_op("cas", ukey, claim.to_json().encode(), 0)]
        result = await kv.txn(ops + pending.ops)
        if not result.ok:
            raise Conflict(f"execution {execution_id} exists", code="already_exists")
        pending.ops.clear()
        return next(int(e["ModifyIndex"]) for e in result.entries if e["Key"] == ukey)

    async def put(key: str, data: bytes) -> None:
        nonlocal claim_index
        if claim_index is None:
            op = kv_op("set", key, data)
            if pending.fits(op, *reserve):
                pending.add(op)
                return
            claim_index = await take_claim()
        if not await kv.put_new(key, data):
            raise BackendError(f"{key} was written by someone else", code="store_error")

    hasher, size, count = hashlib.sha256(), 0, 0
    try:
        for key, data in extra_chunks:
            await put(key, data)
        while tar is not None and (chunk := await to_thread.run_sync(tar.read, chunk_size)):
            size += len(chunk)
            if size > max_tar_bytes:
                raise PayloadTooLarge(
                    f"the tar is larger than {max_tar_bytes} bytes",
                    code="tar_too_large",
                    maximum=max_tar_bytes,
                )
            hasher.update(chunk)
            await put(tar_chunk_key(prefix, execution_id, count), chunk)
            count += 1
        manifest = Manifest(
            chunks=count, size=size, sha256=hasher.hexdigest(), chunk_size=chunk_size
        )
        commit = [record_op, status_op, marker_op, *unique_ops]
        if tar is not None:
            commit.append(kv_op("set", mkey, manifest.to_json().encode()))
        if claim_index is None:
            lead = [kv_op("check-not-exists", rkey), kv_op("check-not-exists", ukey)]
            result = await kv.txn(lead + pending.ops + commit)
            if not result.ok:
                raise Conflict(f"execution {execution_id} exists", code="already_exists")
            return result.modify_index(rkey)
        lead = [kv_op("check-index", ukey, index=claim_index)]
        result = await kv.txn(lead + commit + [kv_op("delete", ukey)])
        if not result.ok and unique is not None and await kv.get(unique[0]) is not None:
            raise Conflict(f"{unique[0]} exists", code="already_exists")
        if not result.ok:
            raise BackendError(
                f"the upload of {execution_id} was removed while in progress", code="store_error"
            )
        return result.modify_index(rkey)
    except BaseException:
        if claim_index is not None:
            await kv.cleanup(execution_folder(prefix, execution_id))
        raise
