"""The tools over streamable HTTP, mounted at ``/mcp`` in ``pyexec serve``.

The mount sits behind the app's ``BearerAuth`` like the API. A tool call goes to the API
of the same app in-process (``httpx.ASGITransport``) with the caller's own
``Authorization`` header, so it passes the same checks an API request does.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import httpx
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from pyexec.client import AsyncClient

from .tools import build_server

__all__ = ["MCP_PATH", "McpEndpoint"]

MCP_PATH = "/mcp"
#: The base URL of in-process calls; nothing is resolved or dialled.
_IN_PROCESS = "http://pyexec.in-process"


class McpEndpoint:
    """The ASGI endpoint for ``/mcp`` and the session manager its lifespan runs."""

    def __init__(self, api: ASGIApp) -> None:
        self._api = api
        server = build_server(self._connect)
        # Made for its session manager; the Starlette app it returns is not used (this
        # endpoint is mounted in pyexec's own, whose lifespan runs ``manager.run()``).
        server.streamable_http_app(
            # Stateless JSON: any replica answers any request, no sticky sessions.
            stateless_http=True,
            json_response=True,
            # The endpoint is guarded by the API's bearer tokens, like the API, which a
            # rebinding page could reach just as well; the Host check would only refuse
            # the operator's own public hostnames.
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.manager: StreamableHTTPSessionManager = server.session_manager

    @contextlib.asynccontextmanager
    async def _connect(self, headers: Mapping[str, str] | None) -> AsyncIterator[AsyncClient]:
        authorization = (headers or {}).get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        async with AsyncClient(
            _IN_PROCESS,
            token=token.strip() if scheme.lower() == "bearer" else None,
            transport=httpx.ASGITransport(app=self._api),
        ) as client:
            yield client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.manager.handle_request(scope, receive, send)
