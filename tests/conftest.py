"""Shared fixtures: settings for this machine, the app with its lifespan, a live server.

Docker tests use the locally built runner image (``PYEXEC_TEST_IMAGE``, default
``pyexec-runner:bookworm``) because no image can be pulled here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import httpx
import pytest

from pyexec.settings import Settings

TEST_IMAGE = os.environ.get("PYEXEC_TEST_IMAGE", "pyexec-runner:bookworm")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests on this machine: the local image, short limits, no env leakage."""
    base: dict[str, Any] = {
        "default_image": TEST_IMAGE,
        "python_images": (("3.11", TEST_IMAGE),),
        "default_python_version": "3.11",
        "default_timeout": 30,
        "default_memory_mb": 256,
        "default_disk_mb": 64,
        "log_format": "text",
        # Tests never make the Docker daemon reach for a registry (only loopback traffic here).
        "docker_pull": False,
        # No warm pool unless a test asks for one: an app per test would otherwise make
        # (and remove) sandboxes nobody uses; pooled paths are tested where they are meant.
        "pool_size": 0,
        # No dependency cache unless a test asks for one (tests/test_deps_cache*.py): a
        # test with requirements otherwise installs them in its setup phase, as before.
        "deps_cache_bytes": 0,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@contextlib.asynccontextmanager
async def app_client(settings: Settings, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client talking to a fresh app in-process, with its lifespan run."""
    from pyexec.api.app import create_app

    app = create_app(settings, **kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://pyexec.test", timeout=120
        ) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.frozen
class LiveServer:
    url: str
    settings: Settings


@contextlib.contextmanager
def live_server(settings: Settings, **app_kwargs: Any) -> Iterator[LiveServer]:
    """uvicorn serving the app on a loopback port in a thread, stopped on exit.

    ``app_kwargs`` go to ``create_app`` (e.g. ``runner=FakeRunner()``)."""
    import uvicorn

    from pyexec.api.app import create_app
    from pyexec.api.server import uvicorn_config

    port = free_port()
    settings = attrs.evolve(settings, host="127.0.0.1", port=port)
    # The served configuration (protocol, limits), quieter and with a lifespan.
    config = uvicorn_config(
        create_app(settings, **app_kwargs), settings, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    try:
        # Bounded readiness poll: uvicorn offers no start-up event to wait on.
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the test server failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not start within 60 s")
            time.sleep(0.02)
        yield LiveServer(f"http://127.0.0.1:{port}", settings)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    with live_server(settings) as live:
        yield live
