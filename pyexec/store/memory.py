"""The in-process store of the embedded default.

Records live in a dict guarded by one lock; tars are spooled to files in a
private temporary directory so a large archive costs disk, not memory.
Nothing survives the process, which is what one machine with local Docker needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Collection, Sequence
from datetime import datetime
from typing import BinaryIO

from anyio import to_thread

from pyexec.errors import Conflict, IdempotentReplay, NotFound
from pyexec.models import Execution, Status, callback_outstanding

from . import CHUNK_SIZE, OUTPUT_STREAMS, Change, LiveOutput, OutputChunk, apply_change

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, spool_dir: str | None = None) -> None:
        self._records: dict[str, Execution] = {}
        self._changed: dict[str, asyncio.Event] = {}
        #: Idempotency key -> the execution holding it (live records only).
        self._keys: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._dir = tempfile.mkdtemp(prefix="pyexec-store-", dir=spool_dir)
        #: Live output of running executions, by id and stream (dropped once terminal).
        self._live: dict[str, dict[str, bytearray]] = {}
        #: Per id, bumped on every change of its record or live output (``watch_output``).
        self._versions: dict[str, int] = {}

    def _tar_path(self, execution_id: str) -> str:
        return os.path.join(self._dir, f"{execution_id}.tar")

    async def create(self, record: Execution, tar: BinaryIO | None) -> None:
        async with self._lock:
            self._check_new(record)
        path = self._tar_path(record.execution_id)
        try:
            if tar is not None:
                await to_thread.run_sync(_copy_to, tar, path)
            async with self._lock:
                # Again: another create may have taken the id or the key meanwhile.
                self._check_new(record)
                self._records[record.execution_id] = record
                self._changed[record.execution_id] = asyncio.Event()
                if record.idempotency is not None:
                    self._keys[record.idempotency.key] = record.execution_id
        except BaseException:
            _unlink(path)
            raise

    def _check_new(self, record: Execution) -> None:
        """``Conflict`` if the id exists, ``IdempotentReplay`` if the key is taken."""
        if record.execution_id in self._records:
            raise Conflict(f"execution {record.execution_id} exists", code="already_exists")
        if record.idempotency is not None:
            holder = self._keys.get(record.idempotency.key)
            if holder is not None:
                held = self._records[holder].idempotency
                raise IdempotentReplay(
                    execution_id=holder, fingerprint=held.fingerprint if held else ""
                )

    async def get(self, execution_id: str) -> Execution:
        try:
            return self._records[execution_id]
        except KeyError:
            raise NotFound(f"no execution {execution_id}") from None

    async def transition(
        self, execution_id: str, change: Change, *, expect: Collection[Status]
    ) -> Execution:
        async with self._lock:
            current = await self.get(execution_id)
            record = apply_change(current, change, expect)
            if record == current:
                return current
            self._records[execution_id] = record
            if record.terminal:
                self._live.pop(execution_id, None)  # the record holds the output now
            event = self._changed[execution_id]
            self._changed[execution_id] = asyncio.Event()
            self._versions[execution_id] = self._versions.get(execution_id, 1) + 1
        event.set()
        if record.terminal:
            _unlink(self._tar_path(execution_id))  # the run is over: free its tar
        return record

    async def open_tar(self, execution_id: str) -> AsyncIterator[bytes]:
        await self.get(execution_id)
        try:
            fh = await to_thread.run_sync(open, self._tar_path(execution_id), "rb")
        except FileNotFoundError:
            raise NotFound(f"the tar of {execution_id} is gone", code="tar_not_found") from None
        try:
            while chunk := await to_thread.run_sync(fh.read, CHUNK_SIZE):
                yield chunk
        finally:
            fh.close()

    async def delete(self, execution_id: str) -> None:
        async with self._lock:
            record = self._records.pop(execution_id, None)
            if record is not None and record.idempotency is not None:
                # The key expires with its record.
                self._keys.pop(record.idempotency.key, None)
            event = self._changed.pop(execution_id, None)
            self._live.pop(execution_id, None)
            self._versions.pop(execution_id, None)
        if event is not None:
            event.set()
        _unlink(self._tar_path(execution_id))
        _unlink(self._artifacts_path(execution_id))

    async def list_expired(self, now: datetime, ttl: float) -> list[str]:
        return [
            r.execution_id
            for r in list(self._records.values())
            if r.terminal
            and r.finished_at is not None
            and (now - r.finished_at).total_seconds() > ttl
        ]

    async def list_active(self) -> list[Execution]:
        return [r for r in list(self._records.values()) if not r.terminal]

    async def list_callbacks_outstanding(self) -> list[Execution]:
        return [r for r in list(self._records.values()) if callback_outstanding(r)]

    async def wait_terminal(self, execution_id: str, timeout: float) -> Execution:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            record = await self.get(execution_id)
            remaining = deadline - loop.time()
            if record.terminal or remaining <= 0:
                return record
            event = self._changed.get(execution_id)
            if event is None:
                return record
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                return await self.get(execution_id)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    async def append_output(self, execution_id: str, chunks: Sequence[OutputChunk]) -> None:
        record = await self.get(execution_id)
        if record.terminal:
            return  # dropped already: the record holds the output
        live = self._live.setdefault(execution_id, {s: bytearray() for s in OUTPUT_STREAMS})
        grew = False
        for chunk in chunks:
            held = live[chunk.stream]
            if chunk.offset > len(held):
                raise Conflict(
                    f"{chunk.stream} of {execution_id} has {len(held)} bytes; "
                    f"a chunk at {chunk.offset} would leave a gap",
                    code="output_gap",
                )
            new = chunk.data[len(held) - chunk.offset :]
            held += new
            grew = grew or bool(new)
        if grew:
            self._versions[execution_id] = self._versions.get(execution_id, 1) + 1
            event = self._changed.get(execution_id)
            if event is not None:
                self._changed[execution_id] = asyncio.Event()
                event.set()

    async def read_output(self, execution_id: str, stream: str, offset: int, limit: int) -> bytes:
        held = self._live.get(execution_id, {}).get(stream)
        if held is None:
            return b""
        return bytes(held[offset : offset + max(limit, 0)])

    async def watch_output(self, execution_id: str, version: int, timeout: float) -> LiveOutput:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            record = await self.get(execution_id)
            live = self._live.get(execution_id, {})
            state = LiveOutput(
                status=record.status,
                stdout=len(live.get("stdout", b"")),
                stderr=len(live.get("stderr", b"")),
                version=self._versions.get(execution_id, 1),
            )
            remaining = deadline - loop.time()
            event = self._changed.get(execution_id)
            if state.version != version or remaining <= 0 or event is None:
                return state
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                continue

    def _artifacts_path(self, execution_id: str) -> str:
        return os.path.join(self._dir, f"{execution_id}.artifacts")

    async def put_artifacts(self, execution_id: str, blob: BinaryIO) -> None:
        await self.get(execution_id)
        path = self._artifacts_path(execution_id)
        await to_thread.run_sync(_copy_to, blob, path + ".tmp")
        os.replace(path + ".tmp", path)
        if execution_id not in self._records:  # deleted meanwhile: it goes with it
            _unlink(path)

    async def open_artifacts(
        self, execution_id: str, start: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        await self.get(execution_id)
        try:
            fh = await to_thread.run_sync(open, self._artifacts_path(execution_id), "rb")
        except FileNotFoundError:
            raise NotFound(f"{execution_id} has no artifacts", code="artifact_not_found") from None
        try:
            fh.seek(start)
            left = length
            while left is None or left > 0:
                size = CHUNK_SIZE if left is None else min(CHUNK_SIZE, left)
                chunk = await to_thread.run_sync(fh.read, size)
                if not chunk:
                    break
                if left is not None:
                    left -= len(chunk)
                yield chunk
        finally:
            fh.close()


def _copy_to(src: BinaryIO, path: str) -> None:
    with open(path, "wb") as out:
        while chunk := src.read(CHUNK_SIZE):
            out.write(chunk)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
