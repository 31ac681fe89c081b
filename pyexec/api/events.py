"""``GET /api/v1/executions/{id}/events``: an execution's live output as server-sent events."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from pyexec.events import KEEPALIVE, Subscription, parse_position
from pyexec.execution_service import ExecutionService

from .executions import execution_id_of

__all__ = ["execution_events"]

#: How long a client waits before it reconnects after the stream broke (EventSource).
RETRY_MILLISECONDS = 1000
#: Largest piece of an event written at once.
SLICE_BYTES = 64 * 1024


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer that gives its subscriber slot back however it
    ends: the execution ended, the client went away (noticed at once, not at the next
    write), or the server shuts down."""

    def __init__(self, subscription: Subscription) -> None:
        super().__init__(
            self._body(subscription),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.subscription = subscription

    @staticmethod
    async def _body(subscription: Subscription) -> AsyncIterator[bytes | memoryview]:
        yield f"retry: {RETRY_MILLISECONDS}\n\n".encode()
        async for frame in subscription.events():
            if frame is None:
                yield KEEPALIVE
                continue
            # In slices, each sent before the next: a slow client's socket buffer holds
            # one slice, never a copy of a large shared frame (the end's record).
            view = memoryview(frame)
            for start in range(0, len(view), SLICE_BYTES):
                yield view[start : start + SLICE_BYTES]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.subscription.close()


async def execution_events(request: Request) -> EventStream:
    service: ExecutionService = request.app.state.service
    position = parse_position(request.headers.get("last-event-id"))
    return EventStream(await service.subscribe(execution_id_of(request), position))
