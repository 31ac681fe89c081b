"""Where an execution lives in Consul KV: key names and the small JSON values beside the data.

Pure functions, no I/O, stdlib only, so the Nomad task (which reads the same layout
with ``urllib``) and the docs can lean on one definition. ``docs/consul-layout.md``
describes the layout for people; this module is the layout for code::

    <prefix>/executions/<id>/status                  plain text: pending|running|completed|...
    <prefix>/executions/<id>/status=<status>         empty; its name shows the status at a glance
    <prefix>/executions/<id>/record                  Execution.to_dict(include_request=True) JSON
    <prefix>/executions/<id>/manifest                tar completion marker (JSON, written last)
    <prefix>/executions/<id>/tar/000000 ...          the tar, raw bytes, in order
    <prefix>/executions/<id>/output/<rev>/stdout/000000 ...   large output, raw UTF-8 bytes
    <prefix>/executions/<id>/upload                  claim of an upload in progress (JSON)
    <prefix>/executions/<id>/live/head               live output sizes {"stdout", "stderr"} (JSON)
    <prefix>/executions/<id>/live/stdout/000000 ...  live output while it runs, raw, in blocks
    <prefix>/executions/<id>/artifacts/000000 ...    the artifacts tar, raw bytes, in order
    <prefix>/executions/<id>/artifacts/manifest      its manifest (JSON, written last)
    <prefix>/idempotency/<sha256 of the key>         {"execution_id", "fingerprint"} (JSON)
    <prefix>/pool/slots/<slot>                       a Nomad warm-pool slot (JSON)
    <prefix>/pool/inputs/<slot>/record, manifest, tar/...  what a claimed slot runs
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "INLINE_OUTPUT_BYTES",
    "STREAMS",
    "Manifest",
    "UploadClaim",
    "artifacts_chunk_key",
    "artifacts_folder",
    "artifacts_manifest_key",
    "chunk_name",
    "execution_folder",
    "executions_root",
    "id_from_folder",
    "idempotency_key",
    "live_block_key",
    "live_folder",
    "live_head_key",
    "manifest_key",
    "output_chunk_key",
    "output_folder",
    "pool_inputs_folder",
    "pool_slot_key",
    "pool_slots_root",
    "record_key",
    "status_key",
    "status_marker_key",
    "tar_chunk_key",
    "upload_key",
]

#: stdout or stderr longer than this (UTF-8 bytes) is chunked under ``output/`` instead of
#: sitting inside the record, so the record stays small enough to read in the Consul UI.
INLINE_OUTPUT_BYTES = 16 * 1024

STREAMS = ("stdout", "stderr")

#: The live output of a running execution is kept in blocks of this many bytes: the
#: last block is rewritten as it fills, so a flush rewrites at most one block per stream.
LIVE_BLOCK_BYTES = 64 * 1024


def executions_root(prefix: str) -> str:
    """``<prefix>/executions/``: one folder below it per execution."""
    return f"{prefix.strip('/')}/executions/"


def execution_folder(prefix: str, execution_id: str) -> str:
    """``<prefix>/executions/<id>/``; the slash keeps a delete-tree off longer ids."""
    return f"{executions_root(prefix)}{execution_id}/"


def id_from_folder(prefix: str, folder: str) -> str | None:
    """The execution id of a folder key as ``?keys&separator=/`` lists it, else ``None``."""
    root = executions_root(prefix)
    if not folder.startswith(root) or not folder.endswith("/"):
        return None
    name = folder[len(root) : -1]
    return name if name and "/" not in name else None


def status_key(prefix: str, execution_id: str) -> str:
    return execution_folder(prefix, execution_id) + "status"


def status_marker_key(prefix: str, execution_id: str, status: str) -> str:
    """``<folder>status=<status>``: an empty key whose *name* carries the status, so the
    Consul UI's folder listing shows it without opening anything; exactly one exists,
    replaced in the transaction that changes the status."""
    return f"{execution_folder(prefix, execution_id)}status={status}"


def record_key(prefix: str, execution_id: str) -> str:
    return execution_folder(prefix, execution_id) + "record"


def manifest_key(prefix: str, execution_id: str) -> str:
    return execution_folder(prefix, execution_id) + "manifest"


def upload_key(prefix: str, execution_id: str) -> str:
    return execution_folder(prefix, execution_id) + "upload"


def idempotency_key(prefix: str, key_digest: str) -> str:
    """Where a submit's ``Idempotency-Key`` (its SHA-256, hex) names its execution; written
    in the transaction that creates the record, deleted with the record."""
    return f"{prefix.strip('/')}/idempotency/{key_digest}"


def chunk_name(index: int) -> str:
    """Six zero-padded digits, so keys sort in chunk order (a million chunks of 256 KiB)."""
    if not 0 <= index < 1_000_000:
        raise ValueError(f"chunk index {index} out of range")
    return f"{index:06d}"


def tar_chunk_key(prefix: str, execution_id: str, index: int) -> str:
    return f"{execution_folder(prefix, execution_id)}tar/{chunk_name(index)}"


def output_folder(prefix: str, execution_id: str, rev: str) -> str:
    return f"{execution_folder(prefix, execution_id)}output/{rev}/"


def output_chunk_key(prefix: str, execution_id: str, rev: str, stream: str, index: int) -> str:
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}")
    return f"{output_folder(prefix, execution_id, rev)}{stream}/{chunk_name(index)}"


def artifacts_folder(prefix: str, execution_id: str) -> str:
    return f"{execution_folder(prefix, execution_id)}artifacts/"


def artifacts_chunk_key(prefix: str, execution_id: str, index: int) -> str:
    return f"{artifacts_folder(prefix, execution_id)}{chunk_name(index)}"


def artifacts_manifest_key(prefix: str, execution_id: str) -> str:
    return f"{artifacts_folder(prefix, execution_id)}manifest"


def pool_slots_root(prefix: str) -> str:
    """``<prefix>/pool/slots/``: one key per slot of the Nomad runner's warm pool."""
    return f"{prefix.strip('/')}/pool/slots/"


def pool_slot_key(prefix: str, slot: str) -> str:
    return pool_slots_root(prefix) + slot


def pool_inputs_folder(prefix: str, slot: str) -> str:
    """Where a claimed slot's inputs go, laid out like an execution's folder (``record``,
    ``manifest``, ``tar/``), so the run task's templates read either the same way."""
    return f"{prefix.strip('/')}/pool/inputs/{slot}/"


@attrs.frozen(kw_only=True)
class Manifest:
    """The tar's completion marker: written in the same transaction as the record, last."""

    chunks: int
    size: int
    sha256: str
    chunk_size: int

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Manifest:
        data: Mapping[str, Any] = json.loads(raw)
        return cls(
            chunks=int(data["chunks"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            chunk_size=int(data["chunk_size"]),
        )


@attrs.frozen(kw_only=True)
class UploadClaim:
    """Marks an upload in progress; its age tells the janitor when a leftover is stale."""

    started_at: str  # ISO 8601, UTC, "Z"
    owner: str  # random token of the writer

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> UploadClaim:
        data: Mapping[str, Any] = json.loads(raw)
        return cls(started_at=str(data["started_at"]), owner=str(data["owner"]))


def live_folder(prefix: str, execution_id: str) -> str:
    """The live output of a running execution (deleted when it turns terminal)."""
    return f"{execution_folder(prefix, execution_id)}live/"


def live_head_key(prefix: str, execution_id: str) -> str:
    """``{"stdout": n, "stderr": m}``: bytes of each stream written, updated after the blocks."""
    return f"{live_folder(prefix, execution_id)}head"


def live_block_key(prefix: str, execution_id: str, stream: str, index: int) -> str:
    """Bytes ``index * LIVE_BLOCK_BYTES`` onwards of a stream's live output."""
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}")
    return f"{live_folder(prefix, execution_id)}{stream}/{chunk_name(index)}"
