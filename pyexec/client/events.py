"""Live output for the client: typed events, the SSE parser, and reconnecting.

``StreamPlan`` does everything but I/O for ``Client.stream``/``AsyncClient.stream``:
the request, the parsing, the position to resume from (``Last-Event-ID``) and the
retries left. The twins only open connections and read lines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import attrs
import httpx

from ._base import _error_from
from .errors import APIError, ClientError
from .models import Execution

__all__ = [
    "STREAM_RETRY",
    "EndEvent",
    "OutputEvent",
    "StatusEvent",
    "StreamEvent",
    "StreamPlan",
]

#: The server sends a keepalive every 15 s: a stream silent this long is broken.
STREAM_READ_TIMEOUT = 45.0


@attrs.frozen
class StreamRetry:
    """Reconnects after a dropped stream: at most ``attempts`` in a row without an event
    in between, with exponential backoff."""

    attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 2.0

    def delays(self) -> Iterator[float]:
        for attempt in range(self.attempts):
            yield min(self.max_delay, self.base_delay * 2**attempt)


STREAM_RETRY = StreamRetry()


@attrs.frozen(kw_only=True)
class OutputEvent:
    """A piece of output: ``stream`` is ``stdout`` or ``stderr``; ``offset`` its byte
    offset in that stream; ``id`` the position to resume after it."""

    stream: str
    offset: int
    text: str
    id: str


@attrs.frozen(kw_only=True)
class StatusEvent:
    """The execution changed state (pending, running); the record as it is then."""

    execution: Execution


@attrs.frozen(kw_only=True)
class EndEvent:
    """The execution is over: its final record. The stream ends after it."""

    execution: Execution


StreamEvent = OutputEvent | StatusEvent | EndEvent


class StreamPlan:
    """One ``stream()`` across its reconnects."""

    def __init__(
        self,
        execution_id: str,
        last_event_id: str | None = None,
        retry: StreamRetry = STREAM_RETRY,
        timeout: float | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.last_event_id = last_event_id
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._retry = retry
        self._delays = retry.delays()
        self._fields: dict[str, str] = {}
        self._data: list[str] = []

    def request_args(self, timeout: float) -> dict[str, Any]:
        """Arguments of the GET to (re)open the stream, from where it stopped."""
        headers = {"Accept": "text/event-stream"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        read = STREAM_READ_TIMEOUT
        if self.deadline is not None:
            read = max(0.05, min(read, self.deadline - time.monotonic()))
        return {
            "method": "GET",
            "url": f"/api/v1/executions/{self.execution_id}/events",
            "headers": headers,
            "timeout": httpx.Timeout(timeout, read=read),
        }

    def expired(self) -> bool:
        """Whether the caller's ``timeout`` has passed (the stream then just ends)."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def refused(self, response: httpx.Response) -> APIError | None:
        """The error a (read) answer other than 200 is, or ``None`` if it is worth
        another try (502/503: a replica going away)."""
        if response.status_code in (502, 503):
            return None
        return _error_from(response)

    def feed(self, line: str) -> StreamEvent | None:
        """One line of the stream; an event once a blank line completes one."""
        if line.startswith(":"):
            return None
        if line:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                self._data.append(value)
            elif name in ("event", "id"):
                self._fields[name] = value
            return None
        fields, data = self._fields, "\n".join(self._data)
        self._fields, self._data = {}, []
        kind = fields.get("event", "message")
        if "id" in fields:
            self.last_event_id = fields["id"]
        return self._event(kind, data, fields.get("id"))

    def _event(self, kind: str, data: str, event_id: str | None) -> StreamEvent | None:
        if not data:
            return None
        body = json.loads(data)
        self._delays = self._retry.delays()  # progress: the retries start over
        if kind in ("stdout", "stderr"):
            return OutputEvent(
                stream=kind, offset=int(body["offset"]), text=body["text"], id=event_id or ""
            )
        if kind == "status":
            return StatusEvent(execution=Execution.from_json(body))
        if kind == "end":
            return EndEvent(execution=Execution.from_json(body))
        return None  # an event kind this client does not know yet

    def broken(self, error: Exception | None = None) -> float:
        """The stream dropped (or closed before its end): the pause before reconnecting;
        raises once the retries are spent."""
        self._fields, self._data = {}, []
        delay = next(self._delays, None)
        if delay is None:
            if isinstance(error, ClientError):
                raise error
            raise ClientError(
                f"the event stream of {self.execution_id} kept breaking"
                + (f": {error}" if error else "")
            )
        return delay
