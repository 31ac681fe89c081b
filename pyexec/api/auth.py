"""Optional bearer-token auth: a pure ASGI middleware, so streaming bodies pass untouched."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

__all__ = ["BearerAuth"]

OPEN_PATHS = frozenset({"/health", "/health/live"})


class BearerAuth:
    def __init__(self, app: ASGIApp, tokens: frozenset[str]) -> None:
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and self._valid(token.strip()):
            await self.app(scope, receive, send)
            return
        message = "missing bearer token" if not header else "invalid bearer token"
        await error_response(401, "unauthorized", message)(scope, receive, send)

    def _valid(self, token: bytes) -> bool:
        # Compare against every token in constant time, so timing tells nothing.
        return any(hmac.compare_digest(token, known) for known in self.tokens)
