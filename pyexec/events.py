"""Live output: an execution's status changes and output as events, on any replica.

The replica that drives a run keeps what the runner hands over (``OnOutput``) in an
``OutputLog`` and flushes it to the store every ``output_flush_seconds`` (sooner
once ``FLUSH_BYTES`` wait), at most ``FLUSH_MAX_BYTES`` per stream per write; a
flushed byte leaves memory, so the log holds only what is not in the store yet.
Every replica serves event streams from one ``Feed`` per execution it streams:
the feed follows the store (``watch_output``: status and flushed sizes) and, on
the driving replica, the log, and wakes its subscribers on each change. A
subscriber holds only its two offsets and the one event it is sending: bytes come
from the log, the store, or (once the execution is terminal) the feed's one copy
of the record's output. A slow subscriber only falls behind; nothing waits for it.

Positions: each output event's id is ``<stdout bytes>-<stderr bytes>`` sent up to
and including it; ``Last-Event-ID`` resumes from there. Events are cut at UTF-8
character boundaries, so each carries whole characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable

import attrs

from .errors import BadRequest, NotFound, PyexecError, TooManySubscribers
from .models import Execution
from .runner.docker_stream import cut_partial_utf8
from .settings import Settings
from .store import OUTPUT_STREAMS, LiveOutput, OutputChunk, Store

__all__ = ["Event", "EventHub", "OutputLog", "Subscription", "parse_position"]

log = logging.getLogger("pyexec.events")

#: Flush to the store early once this many bytes wait (of both streams).
FLUSH_BYTES = 64 * 1024
#: Most bytes of one stream one store write carries.
FLUSH_MAX_BYTES = 256 * 1024
#: Most bytes one output event carries.
EVENT_BYTES = 32 * 1024
#: A comment line goes out after this many seconds without an event (keeps proxies open).
KEEPALIVE_SECONDS = 15.0
#: Pauses before a feed retries the store after an error.
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)

_POSITION = re.compile(r"(\d{1,15})-(\d{1,15})")


def parse_position(value: str | None) -> dict[str, int]:
    """Offsets to resume from, from a ``Last-Event-ID`` (``<stdout>-<stderr>``)."""
    if not value:
        return dict.fromkeys(OUTPUT_STREAMS, 0)
    match = _POSITION.fullmatch(value)
    if match is None:
        raise BadRequest(
            f"Last-Event-ID must look like <stdout bytes>-<stderr bytes>, got {value[:40]!r}",
            code="invalid_last_event_id",
        )
    return {"stdout": int(match[1]), "stderr": int(match[2])}


def position_id(position: dict[str, int]) -> str:
    return f"{position['stdout']}-{position['stderr']}"


@attrs.frozen
class Event:
    """One server-sent event: ``kind`` is ``status``, ``stdout``, ``stderr`` or ``end``;
    ``data`` its JSON text; ``id`` the position (output events only)."""

    kind: str
    data: str
    id: str | None = None

    def encode(self) -> bytes:
        head = f"event: {self.kind}\n" + (f"id: {self.id}\n" if self.id is not None else "")
        return f"{head}data: {self.data}\n\n".encode()


#: What goes out when nothing happened for a while (an SSE comment).
KEEPALIVE = b": keepalive\n\n"


class OutputLog:
    """The output of one run on the replica that drives it, until it is in the store."""

    def __init__(
        self, execution_id: str, store: Store, interval: float, on_change: Callable[[], None]
    ) -> None:
        self.execution_id = execution_id
        self._store = store
        self._interval = interval
        self._on_change = on_change
        #: Per stream: its offset of the first byte held, and the bytes not yet stored.
        self.base = dict.fromkeys(OUTPUT_STREAMS, 0)
        self.held = {stream: bytearray() for stream in OUTPUT_STREAMS}
        self._due = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"pyexec-flush-{execution_id}")

    def feed(self, stream: str, data: bytes) -> None:
        """The runner's ``OnOutput``: keep ``data``, wake the subscribers."""
        if not data:
            return
        self.held[stream] += data
        if sum(len(h) for h in self.held.values()) >= FLUSH_BYTES:
            self._due.set()
        self._on_change()

    def end(self, stream: str) -> int:
        return self.base[stream] + len(self.held[stream])

    def slice(self, stream: str, offset: int, limit: int) -> bytes | None:
        """Bytes from ``offset`` if this log still holds them, else ``None`` (stored)."""
        start = offset - self.base[stream]
        if start < 0:
            return None
        with memoryview(self.held[stream]) as held:  # one copy, of the slice only
            return bytes(held[start : start + limit])

    async def flush(self) -> None:
        chunks = []
        for stream in OUTPUT_STREAMS:
            if self.held[stream]:
                with memoryview(self.held[stream]) as held:
                    data = bytes(held[:FLUSH_MAX_BYTES])
                chunks.append(OutputChunk(stream, self.base[stream], data))
        if not chunks:
            return
        await self._store.append_output(self.execution_id, chunks)
        for chunk in chunks:
            # Bytes fed meanwhile were appended behind these: drop exactly what was stored.
            del self.held[chunk.stream][: len(chunk.data)]
            self.base[chunk.stream] += len(chunk.data)

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), self._interval)
            self._due.clear()
            try:
                await self.flush()
            except PyexecError as exc:
                # Kept and retried: what is held stays bounded by the run's output cap.
                log.warning("could not store output of %s: %s", self.execution_id, exc.message)
                continue
            if sum(len(h) for h in self.held.values()) >= FLUSH_BYTES:
                self._due.set()  # a burst (or an adopted run's backlog): go on at once

    def close(self) -> None:
        """Stop flushing (the record holds the output now); what is held goes with it."""
        self._flusher.cancel()


class Feed:
    """One execution's state as this replica streams it, shared by its subscribers."""

    def __init__(self, hub: EventHub, execution_id: str) -> None:
        self.hub = hub
        self.execution_id = execution_id
        self.subscribers = 0
        self.record: Execution | None = None
        self.state: LiveOutput | None = None
        self.error: PyexecError | None = None
        self.closed = False
        #: Replaced (after being set) on every change: subscribers wait on the current one.
        self.changed = asyncio.Event()
        self._ready = asyncio.Event()
        #: Encoded once per change, shared by all subscribers (the end carries all output).
        self.status_frame = b""
        self.end_frame = b""
        self.final: dict[str, bytes] = {}
        #: The last piece read from the store per stream, (offset, bytes): subscribers
        #: that follow the tail together ask for the same bytes, read once.
        self._stored: dict[str, tuple[int, bytes]] = {}
        self._reading = {stream: asyncio.Lock() for stream in OUTPUT_STREAMS}
        self._task = asyncio.create_task(self._follow(), name=f"pyexec-feed-{execution_id}")

    def notify(self) -> None:
        event, self.changed = self.changed, asyncio.Event()
        event.set()

    async def ready(self) -> None:
        await self._ready.wait()
        if self.error is not None:
            raise self.error

    def _take(self, record: Execution) -> None:
        self.record = record
        data = json.dumps(record.to_dict(), ensure_ascii=False)
        if record.terminal:
            self.final = {s: getattr(record, s).encode("utf-8") for s in OUTPUT_STREAMS}
            self.end_frame = Event("end", data).encode()
        else:
            self.status_frame = Event("status", data).encode()

    async def _follow(self) -> None:
        store, version, delays = self.hub.store, 0, iter(RETRY_DELAYS)
        try:
            while not self.closed:
                try:
                    state = await store.watch_output(self.execution_id, version, KEEPALIVE_SECONDS)
                    if self.record is None or state.status is not self.record.status:
                        self._take(await store.get(self.execution_id))
                except NotFound as exc:
                    self.error = exc
                    return
                except PyexecError as exc:
                    if self.record is None:  # never read: the request gets the error
                        self.error = exc
                        return
                    log.warning("events of %s: %s", self.execution_id, exc.message)
                    await asyncio.sleep(next(delays, RETRY_DELAYS[-1]))
                    continue
                delays = iter(RETRY_DELAYS)
                self.state, version = state, state.version
                self._ready.set()
                self.notify()
                if self.record is not None and self.record.terminal:
                    return  # nothing changes any more
        finally:
            self._ready.set()
            self.notify()

    async def read(self, stream: str, offset: int) -> bytes:
        """The next bytes of ``stream`` from ``offset`` this replica can hand out (at
        most ``EVENT_BYTES``, whole characters unless the output ends there)."""
        record = self.record
        if record is not None and record.terminal:
            return cut_partial_utf8(self.final[stream][offset : offset + EVENT_BYTES])
        output = self.hub.logs.get(self.execution_id)
        data = output.slice(stream, offset, EVENT_BYTES) if output is not None else None
        if data is None:
            stored = self.state.size(stream) if self.state is not None else 0
            if output is not None:
                stored = max(stored, output.base[stream])
            if stored <= offset:
                return b""
            data = await self._read_stored(stream, offset, stored)
        return cut_partial_utf8(data)

    async def _read_stored(self, stream: str, offset: int, stored: int) -> bytes:
        async with self._reading[stream]:
            start, data = self._stored.get(stream, (0, b""))
            if start <= offset < start + len(data):
                return data[offset - start :]
            data = await self.hub.store.read_output(
                self.execution_id, stream, offset, min(EVENT_BYTES, stored - offset)
            )
            self._stored[stream] = (offset, data)
            return data

    async def aclose(self) -> None:
        self.closed = True
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class EventHub:
    """This replica's output logs (runs it drives) and feeds (executions it streams)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.logs: dict[str, OutputLog] = {}
        self.feeds: dict[str, Feed] = {}
        self.closing = False

    def output_log(self, execution_id: str) -> OutputLog:
        """A log for a run this replica launches; its ``feed`` is the runner's ``OnOutput``."""
        output = OutputLog(
            execution_id,
            self.store,
            self.settings.output_flush_seconds,
            lambda: self._changed(execution_id),
        )
        self.logs[execution_id] = output
        return output

    def release(self, execution_id: str) -> None:
        """The run's end is stored (its record holds the output): drop its log."""
        output = self.logs.pop(execution_id, None)
        if output is not None:
            output.close()
            self._changed(execution_id)

    def _changed(self, execution_id: str) -> None:
        feed = self.feeds.get(execution_id)
        if feed is not None:
            feed.notify()

    def _join(self, execution_id: str) -> Feed:
        feed = self.feeds.get(execution_id)
        if feed is None:
            feed = self.feeds[execution_id] = Feed(self, execution_id)
        cap = self.settings.max_event_subscribers
        if feed.subscribers >= cap:
            raise TooManySubscribers(
                f"execution {execution_id} already has {feed.subscribers} event streams on "
                f"this server (its cap is {cap}); retry later",
                execution_id=execution_id,
                subscribers=feed.subscribers,
            )
        feed.subscribers += 1
        return feed

    async def _leave(self, feed: Feed) -> None:
        feed.subscribers -= 1
        if feed.subscribers <= 0 and self.feeds.get(feed.execution_id) is feed:
            del self.feeds[feed.execution_id]
            await feed.aclose()

    async def open(self, execution_id: str, position: dict[str, int]) -> Subscription:
        """A subscription to the events of ``execution_id`` from ``position``: takes one of
        its subscriber slots (``TooManySubscribers`` if none is left) and checks the
        execution exists (``NotFound``), so both are answered before the stream opens.
        ``close`` it when done."""
        feed = self._join(execution_id)
        try:
            await feed.ready()
        except BaseException:
            await self._leave(feed)
            raise
        return Subscription(self, feed, dict(position))

    def close(self) -> None:
        """Ends every stream, so clients reconnect elsewhere (through the store). The logs
        go on flushing while their runs go on (``release`` stops each at its run's end)."""
        self.closing = True
        for feed in list(self.feeds.values()):
            feed.notify()


class Subscription:
    """One client's event stream: its position, and the event it is sending."""

    def __init__(self, hub: EventHub, feed: Feed, position: dict[str, int]) -> None:
        self._hub = hub
        self._feed = feed
        self.position = position
        self._closed = False

    async def events(self) -> AsyncIterator[bytes | None]:
        """Encoded events until the execution ends (``end``) or the server closes;
        ``None`` when a keepalive is due. A status or end frame is the feed's own (shared
        by every subscriber): send it without copying."""
        feed, position, sent_status = self._feed, self.position, None
        while not (self._hub.closing or feed.closed):
            changed = feed.changed
            record = feed.record
            if record is None:
                return
            if not record.terminal and record.status is not sent_status:
                sent_status = record.status
                yield feed.status_frame
            sent = False
            for stream in OUTPUT_STREAMS:
                try:
                    data = await feed.read(stream, position[stream])
                except PyexecError as exc:  # the store: this stream waits, then tries again
                    log.warning("output of %s unreadable: %s", feed.execution_id, exc.message)
                    continue
                if not data:
                    continue
                offset = position[stream]
                position[stream] += len(data)
                text = data.decode("utf-8", errors="replace")
                body = json.dumps({"offset": offset, "text": text}, ensure_ascii=False)
                yield Event(stream, body, position_id(position)).encode()
                sent = True
            if sent:
                continue
            if record.terminal:
                yield feed.end_frame
                return
            if feed.error is not None:
                return
            try:
                await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
            except TimeoutError:
                yield None

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._hub._leave(self._feed)
