"""ASGI middleware: a request id on every request, its response and its log lines; a cap
on the size of a request's head."""

from __future__ import annotations

import time
import uuid

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pyexec.logs import ACCEPTABLE_ID, REQUEST_ID_HEADER, access_logger, request_id_var

from .errors import error_response

__all__ = ["HeadLimitMiddleware", "RequestIdMiddleware"]


class RequestIdMiddleware:
    """Gives each HTTP request an id (the caller's ``X-Request-ID`` if acceptable, else a new
    one), echoes it on the response, keeps it in context, and logs one access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_id(scope) or uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_logger.info(
                "%s %s %s",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )
            request_id_var.reset(token)


def _incoming_id(scope: Scope) -> str | None:
    wanted = REQUEST_ID_HEADER.lower().encode()
    for key, value in scope["headers"]:
        if key == wanted:
            text = value.decode("latin-1").strip()
            return text if ACCEPTABLE_ID.match(text) else None
    return None


class HeadLimitMiddleware:
    """Refuses a request whose path, query and headers exceed ``limit`` bytes with 431
    ``headers_too_large``, the answer the protocol gives when its parser gives up first
    (``pyexec.api.protocol``), whichever way the bytes arrived."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(key) + len(value) + 4 for key, value in scope["headers"])
            if size > self.limit:
                message = f"the request line and headers exceed {self.limit} bytes"
                response = error_response(431, "headers_too_large", message)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
