"""The app factory: backends are chosen here, once, from ``Settings``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from pyexec.callbacks import CallbackSender
from pyexec.deps.cache import DepsCache
from pyexec.errors import BadRequest
from pyexec.execution_service import ExecutionService, Hooks
from pyexec.logs import log_finished, log_started
from pyexec.mcp.http import MCP_PATH, McpEndpoint
from pyexec.metrics import Metrics, metrics_route
from pyexec.models import Execution
from pyexec.runner import Runner
from pyexec.runner.pool import WarmPool
from pyexec.settings import Settings
from pyexec.store import Store

from . import artifacts, events, executions, meta
from . import eval as eval_api
from .auth import BearerAuth
from .errors import exception_handlers
from .middleware import HeadLimitMiddleware, RequestIdMiddleware
from .protocol import MAX_HEAD_BYTES

__all__ = ["build_backends", "create_app"]


def build_backends(settings: Settings) -> tuple[Store, Runner]:
    """The store and runner ``settings`` select (see ``Settings.backend``)."""
    store: Store
    runner: Runner
    if settings.consul_addr:
        from pyexec.store.consul import ConsulStore

        store = ConsulStore.from_settings(settings)
    else:
        from pyexec.store.memory import MemoryStore

        store = MemoryStore()
    if settings.nomad_addr:
        if not settings.consul_addr:
            raise BadRequest(
                "the Nomad runner keeps tars and state in Consul: set CONSUL_HTTP_ADDR too",
                code="invalid_setting",
            )
        from pyexec.runner.nomad import NomadRunner

        runner = NomadRunner.from_settings(settings, store)
    else:
        from pyexec.runner.docker import DockerRunner

        runner = DockerRunner(settings)
    return store, runner


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    runner: Runner | None = None,
) -> Starlette:
    """The pyexec ASGI app. ``store``/``runner`` override the configured backends (tests)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service = app.state.service
        await service.startup()
        callbacks.start()
        try:
            async with mcp.manager.run():
                yield
        finally:
            await service.shutdown(grace=0)
            await callbacks.aclose()
            await service.runner.aclose()
            await service.store.aclose()

    if store is None or runner is None:
        default_store, default_runner = build_backends(settings)
        store = store or default_store
        runner = runner or default_runner
    # Backend errors and runs in flight are counted at the seams (pyexec.metrics).
    metrics = Metrics()
    pool = getattr(runner, "pool", None)
    if not isinstance(pool, WarmPool):
        pool = None
    if pool is not None:
        metrics.watch_pool(pool)
    deps = getattr(getattr(runner, "deps", None), "cache", None)
    if isinstance(deps, DepsCache):
        metrics.watch_deps(deps)
    store, runner = metrics.store(store), metrics.runner(runner)

    async def api(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)

    # MCP tools at /mcp, behind the same bearer tokens; their calls go to `api` (this app).
    mcp = McpEndpoint(api)
    routes = [
        Route(MCP_PATH, mcp, methods=["GET", "POST", "DELETE"]),
        Route("/api/v1/exec/sync", executions.exec_sync, methods=["POST"]),
        Route("/api/v1/exec/async", executions.exec_async, methods=["POST"]),
        # One route per path, so a 405 lists every method the path has in its Allow.
        Route(
            "/api/v1/executions/{execution_id}",
            executions.execution,
            methods=["GET", "DELETE"],
        ),
        Route("/api/v1/executions/{execution_id}/logs", executions.execution_logs, methods=["GET"]),
        Route("/api/v1/executions/{execution_id}/events", events.execution_events, methods=["GET"]),
        Route(
            "/api/v1/executions/{execution_id}/artifacts",
            artifacts.artifacts_tar,
            methods=["GET"],
        ),
        Route(
            "/api/v1/executions/{execution_id}/artifacts/{path:path}",
            artifacts.artifact_file,
            methods=["GET"],
        ),
        Route("/api/v1/eval", eval_api.eval_endpoint, methods=["POST"]),
        Route("/api/v1/eval/async", eval_api.eval_async_endpoint, methods=["POST"]),
        Route("/api/v1/version", meta.version, methods=["GET"]),
        Route("/health", meta.health, methods=["GET"]),
        Route("/health/live", meta.liveness, methods=["GET"]),
        Route("/openapi.json", meta.openapi, methods=["GET"]),
        Route("/docs", meta.docs_page, methods=["GET"]),
        Mount("/docs/static", app=meta.swagger_assets(), name="swagger"),
        metrics_route(metrics),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers=exception_handlers,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(HeadLimitMiddleware, limit=MAX_HEAD_BYTES),
            Middleware(BearerAuth, tokens=settings.tokens()),
        ],
        lifespan=lifespan,
    )
    app.state.service = ExecutionService(settings, store, runner)
    callbacks = CallbackSender(
        settings, store, on_attempt=metrics.callback_attempted, on_end=metrics.callback_ended
    )
    app.state.service.hooks = Hooks(
        on_started=_each(metrics.execution_started, log_started),
        on_finished=_each(metrics.execution_finished, log_finished, callbacks.on_finished),
    )
    app.state.metrics = metrics
    app.state.pool = pool
    return app


def _each(*observers: Callable[[Execution], None]) -> Callable[[Execution], None]:
    """One hook that calls every observer in turn."""

    def observe(record: Execution) -> None:
        for observer in observers:
            observer(record)

    return observe
