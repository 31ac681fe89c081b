"""``pyexec mcp``: the tools over stdio, talking to the pyexec server of ``--server``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

import anyio

from pyexec.client import AsyncClient

from .tools import build_server

__all__ = ["serve_stdio"]


def serve_stdio(server_url: str, token: str | None) -> None:
    """Serve the tools on stdin/stdout until the MCP client closes them."""

    async def main() -> None:
        # One client for the whole session; stdout carries only the protocol.
        async with AsyncClient(server_url, token=token) as client:

            @contextlib.asynccontextmanager
            async def connect(headers: Mapping[str, str] | None) -> AsyncIterator[AsyncClient]:
                del headers  # stdio has none; the token comes from --token
                yield client

            await build_server(connect).run_stdio_async()

    anyio.run(main)
