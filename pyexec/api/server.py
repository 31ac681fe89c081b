"""``pyexec serve``: uvicorn around the app, with a shutdown that drains first.

On SIGTERM/SIGINT the server stops accepting connections, lets sync requests
finish for ``shutdown_grace_seconds``, then kills the local runs that are left
(recording them as ``killed``), so every caller still waiting gets an answer.
Runs on Nomad are left running; the next instance adopts them.
"""

from __future__ import annotations

import asyncio
import types

import uvicorn

from pyexec.execution_service import ExecutionService
from pyexec.logs import configure_logging
from pyexec.settings import Settings

from .app import create_app

__all__ = ["serve"]


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: ExecutionService, grace: float) -> None:
        super().__init__(config)
        self._service = service
        self._grace = grace
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        if self._drain is None:
            loop = asyncio.get_event_loop()
            self._drain = loop.create_task(self._service.shutdown(grace=self._grace))
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    configure_logging(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Long enough for the drain to kill and record what is left, and answer.
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 15,
        log_level=settings.log_level.lower(),
        # Our JSON handler (pyexec.logs) formats uvicorn's lines too; the request-id
        # middleware writes the access line, with the request id on it.
        log_config=None,
        access_log=False,
        proxy_headers=True,
    )
    _DrainingServer(config, app.state.service, settings.shutdown_grace_seconds).run()
