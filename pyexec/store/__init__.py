"""The store seam: execution records and their tars.

One module per backend: ``memory`` (the embedded default) and ``consul``.
``pyexec.api.app`` picks one from ``Settings``; nothing else imports a backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Sequence
from datetime import datetime
from typing import BinaryIO, Protocol

import attrs

from pyexec.errors import Conflict, TransitionRefused
from pyexec.models import TRANSITIONS, Execution, Status

__all__ = [
    "CHUNK_SIZE",
    "OUTPUT_STREAMS",
    "Change",
    "LiveOutput",
    "OutputChunk",
    "Store",
    "apply_change",
    "check_transition",
]

#: A state change: the record as stored now -> the record to store. Pure: a store may
#: call it again on a fresher record when another writer got in between.
Change = Callable[[Execution], Execution]

#: Tars are read and written in pieces of this size (Consul caps a value at 512 KiB).
CHUNK_SIZE = 256 * 1024

#: The output streams of a run, in the order their positions are written.
OUTPUT_STREAMS = ("stdout", "stderr")


@attrs.frozen
class OutputChunk:
    """Bytes of one output stream, starting at byte ``offset`` of that stream."""

    stream: str
    offset: int
    data: bytes


@attrs.frozen
class LiveOutput:
    """How much live output the store holds for an execution, and its status.

    ``version`` is opaque: it changes whenever the sizes or the status do (pass it to
    ``watch_output`` to wait for the next change).
    """

    status: Status
    stdout: int
    stderr: int
    version: int

    def size(self, stream: str) -> int:
        return self.stdout if stream == "stdout" else self.stderr


class Store(Protocol):
    async def create(self, record: Execution, tar: BinaryIO | None) -> None:
        """Store a new record with its tar, all or nothing.

        ``tar`` is a readable binary file positioned at the start of the archive; it is
        read in chunks, never whole. ``None``: no tar is kept (the runner gets it
        directly). Raises ``Conflict`` if the id exists.

        A stored tar is needed only while the execution is pending (its run fetches it
        on the way to running): the transition out of ``pending`` frees it.
        """

    async def get(self, execution_id: str) -> Execution:
        """The current record; ``NotFound`` if there is none."""

    async def transition(
        self, execution_id: str, change: Change, *, expect: Collection[Status]
    ) -> Execution:
        """Store ``change(current)`` if the stored status is in ``expect``; returns it.

        Applied inside the store's own check-and-set loop: with two writers racing, each
        change is applied to the record the other left, or refused with
        ``TransitionRefused`` (which carries the record as it is) once the status leaves
        ``expect``. A terminal status never changes again (``check_transition``). A change
        that returns the record unchanged writes nothing. ``NotFound`` if there is none.
        """

    def open_tar(self, execution_id: str) -> AsyncIterator[bytes]:
        """The stored tar, chunk by chunk; ``NotFound`` if there is none (not stored, or
        freed once the execution left ``pending``)."""

    async def delete(self, execution_id: str) -> None:
        """Remove the record and its tar. Deleting what is gone succeeds."""

    async def list_expired(self, now: datetime, ttl: float) -> list[str]:
        """Ids of terminal executions that finished more than ``ttl`` seconds before ``now``,
        and of incomplete leftovers (a failed upload) older than that."""

    async def list_active(self) -> list[Execution]:
        """Records that are not terminal (pending or running)."""

    async def list_callbacks_outstanding(self) -> list[Execution]:
        """Terminal records whose completion callback is still to be delivered
        (``pyexec.models.callback_outstanding``)."""

    async def wait_terminal(self, execution_id: str, timeout: float) -> Execution:
        """Wait, without busy polling, until the record is terminal or ``timeout`` passes;
        returns the record as it is then (maybe still not terminal)."""

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` if the store cannot be reached."""

    async def aclose(self) -> None:
        """Release connections; idempotent."""

    async def append_output(self, execution_id: str, chunks: Sequence[OutputChunk]) -> None:
        """Add to the live output of an execution that runs: each chunk continues its
        stream at its ``offset`` (bytes the store holds already are skipped, so a retried
        write is harmless; a gap raises ``Conflict``). Only the replica that drives the
        run writes it. The live output is dropped when the execution turns terminal: its
        record holds the output from then on. ``NotFound`` if there is no record."""

    async def read_output(self, execution_id: str, stream: str, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes of the live output of ``stream`` from ``offset``; fewer (or
        none) once it ends there or was dropped."""

    async def watch_output(self, execution_id: str, version: int, timeout: float) -> LiveOutput:
        """The live output's state as soon as its ``version`` differs from ``version``
        (``0``: at once), or when ``timeout`` seconds passed; ``NotFound`` if there is no
        record. Waits without busy polling (Consul: a blocking query)."""

    async def put_artifacts(self, execution_id: str, blob: BinaryIO) -> None:
        """Keep the artifacts of an execution: ``blob``, a tar (``pyexec.artifacts``), read
        in chunks from where it stands. Stored before the final record that lists them;
        replaces what an earlier call stored; ``delete`` removes it with the record."""

    def open_artifacts(
        self, execution_id: str, start: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """``length`` bytes of the stored artifacts blob from ``start`` (to its end by
        default), chunk by chunk; ``NotFound`` (``artifact_not_found``) if none is stored."""


def apply_change(current: Execution, change: Change, expect: Collection[Status]) -> Execution:
    """``change(current)``, checked: ``TransitionRefused`` unless the status is in ``expect``,
    ``Conflict`` if the change is not a legal transition."""
    if current.status not in expect:
        raise TransitionRefused(
            f"execution {current.execution_id} is {current.status.value}, "
            f"expected one of {sorted(s.value for s in expect)}",
            current=current,
        )
    new = change(current)
    if new.execution_id != current.execution_id:
        raise ValueError("a change may not alter the execution id")
    check_transition(current, new, expect)
    return new


def check_transition(current: Execution, new: Execution, expect: Collection[Status]) -> None:
    """Raise ``Conflict`` unless ``current`` may become ``new`` under ``expect``."""
    if current.status not in expect:
        raise TransitionRefused(
            f"execution {current.execution_id} is {current.status.value}, "
            f"expected one of {sorted(s.value for s in expect)}",
            current=current,
        )
    if new.status != current.status and new.status not in TRANSITIONS[current.status]:
        raise Conflict(
            f"execution {current.execution_id} cannot go from {current.status.value} "
            f"to {new.status.value}",
            code="invalid_transition",
            status=current.status.value,
        )
