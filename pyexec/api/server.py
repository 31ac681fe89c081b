"""``pyexec serve``: uvicorn around the app, with a shutdown that drains first.

On SIGTERM/SIGINT the server stops accepting connections, lets sync requests
finish for ``shutdown_grace_seconds``, then kills the local runs that are left
(recording them as ``killed``), so every caller still waiting gets an answer.
Runs on Nomad are left running; the next instance adopts them.
"""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from pyexec.execution_service import ExecutionService
from pyexec.logs import configure_logging
from pyexec.settings import Settings, SettingsError

from .app import create_app
from .protocol import MAX_HEAD_BYTES, JsonErrorH11Protocol

__all__ = ["check_exposure", "serve", "uvicorn_config"]

log = logging.getLogger("pyexec.server")


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


def check_exposure(settings: Settings) -> None:
    """Refuse to serve code execution to the network without tokens unless opted in;
    when opted in, say so in the log (at every start)."""
    if not settings.exposed_without_tokens(settings.tokens()):
        return
    if not settings.allow_unauthenticated:
        raise SettingsError(
            f"PYEXEC_HOST={settings.host} is not a loopback address and no API tokens are "
            "set (PYEXEC_API_TOKENS or PYEXEC_API_TOKEN_FILE): anyone who reaches the port "
            "could run code. Set tokens, bind 127.0.0.1, or opt in with "
            "PYEXEC_ALLOW_UNAUTHENTICATED=true (--allow-unauthenticated)",
            name="PYEXEC_HOST",
        )
    log.warning(
        "serving on %s:%d WITHOUT API tokens (PYEXEC_ALLOW_UNAUTHENTICATED): anyone who "
        "reaches this port can run code",
        settings.host,
        settings.port,
    )


def uvicorn_config(app: ASGIApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """How uvicorn serves ``app``: the one configuration for `pyexec serve` and the tests
    (which override the log level, say, through ``overrides``)."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        # Malformed or oversized request heads get the JSON error shape too.
        "http": JsonErrorH11Protocol,
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
        # Long enough for the drain to kill and record what is left, and answer.
        "timeout_graceful_shutdown": int(settings.shutdown_grace_seconds) + 15,
        "log_level": settings.log_level.lower(),
        # Our JSON handler (pyexec.logs) formats uvicorn's lines too; the request-id
        # middleware writes the access line, with the request id on it.
        "log_config": None,
        "access_log": False,
        "proxy_headers": True,
    }
    return uvicorn.Config(app, **{**options, **overrides})


def serve(settings: Settings) -> None:
    configure_logging(settings)
    check_exposure(settings)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    _DrainingServer(config, app.state.service, settings.shutdown_grace_seconds).run()
