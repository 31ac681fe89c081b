"""Idempotent submits: the ``Idempotency-Key`` header, checked, and what it is bound to.

A submit that carries a key is stored with ``IdempotencyKey(key, fingerprint)``; the
store keeps the key unique among live records, written atomically with the record
(``Store.create`` raises ``IdempotentReplay`` when the key is taken). The same key with
the same request (same fingerprint) is the same execution; with another request it is
``409 idempotency_conflict``. The key is deleted with its record, so it expires with it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import BinaryIO

from .errors import BadRequest, Conflict
from .models import ExecutionRequest, IdempotencyKey

__all__ = ["HEADER", "MAX_KEY_LENGTH", "bind", "check_key", "refuse_reuse"]

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


def check_key(raw: str | None) -> str | None:
    """The header's value, if any: 1-255 visible ASCII characters, else 400."""
    if raw is None:
        return None
    if not 0 < len(raw) <= MAX_KEY_LENGTH or not all(33 <= ord(c) <= 126 for c in raw):
        raise BadRequest(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} visible ASCII characters (a UUID will do)",
            code="invalid_idempotency_key",
            field=HEADER,
        )
    return raw


def bind(key: str, request: ExecutionRequest, tar: BinaryIO) -> IdempotencyKey:
    """``key`` bound to this request: its metadata and its tar's bytes (reads the tar,
    then rewinds it; blocking, so call it off the event loop)."""
    start = tar.tell()
    tar_digest = hashlib.file_digest(tar, "sha256").hexdigest()  # type: ignore[arg-type]
    tar.seek(start, os.SEEK_SET)
    metadata = json.dumps(request.to_dict(), sort_keys=True, separators=(",", ":"))
    fingerprint = hashlib.sha256(f"{metadata}\n{tar_digest}".encode()).hexdigest()
    return IdempotencyKey(key=hashlib.sha256(key.encode()).hexdigest(), fingerprint=fingerprint)


def refuse_reuse(execution_id: str) -> Conflict:
    return Conflict(
        f"this {HEADER} was used for a different request (execution {execution_id}); "
        "use a new key for a new request",
        code="idempotency_conflict",
        execution_id=execution_id,
    )
