"""Optional bearer-token auth: a pure ASGI middleware, so streaming bodies pass untouched.

Health checks and the API's description (the OpenAPI document and Swagger UI) are open:
a schema is not a secret, and Swagger UI must load before a token can be typed into it.
Everything that reads or runs anything needs a token.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import error_response

__all__ = ["BearerAuth"]

OPEN_PATHS = frozenset({"/health", "/health/live", "/openapi.json", "/docs"})
OPEN_PREFIXES = ("/docs/static/",)


class BearerAuth:
    def __init__(self, app: ASGIApp, tokens: frozenset[str]) -> None:
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens or _open(scope["path"]):
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


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)
