"""Service endpoints: health, version, the OpenAPI document and Swagger UI (local assets)."""

from __future__ import annotations

import os
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from pyexec.__about__ import __version__

from .openapi import openapi_document

__all__ = ["docs_page", "health", "liveness", "openapi", "swagger_assets", "version"]


async def health(request: Request) -> JSONResponse:
    """Readiness: each backend checked separately; 503 when one is unreachable. With a
    warm pool, its ready sandboxes per image, and which pools are empty (runs still
    work, on the cold path: ``degraded``, not unavailable); of them, those that
    imported a prewarmed dependency set ahead, per image and module list."""
    checks = await request.app.state.service.health()
    ok = all(value == "ok" for value in checks.values())
    body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
    pool = request.app.state.pool
    if pool is not None:
        ready = pool.ready()
        empty = sorted(image for image, count in ready.items() if count == 0)
        body["pool"] = {"ready": ready, "empty": empty}
        preloaded = pool.ready_preloaded()
        if preloaded:
            body["pool"]["preloaded"] = preloaded
        if ok and empty:
            body["status"] = "degraded"
    return JSONResponse(body, status_code=200 if ok else 503)


async def liveness(request: Request) -> JSONResponse:
    """Liveness: the process answers; backends are not consulted."""
    return JSONResponse({"status": "ok"})


async def version(request: Request) -> JSONResponse:
    settings = request.app.state.service.settings
    return JSONResponse({"version": __version__, "backend": settings.backend})


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(openapi_document(request.app.state.service.settings))


_DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>pyexec API</title>
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});
  </script>
</body>
</html>
"""


async def docs_page(request: Request) -> HTMLResponse:
    return HTMLResponse(_DOCS_HTML)


def swagger_assets() -> StaticFiles:
    """Swagger UI's files from the swagger-ui-py wheel: no CDN, works air-gapped."""
    import swagger_ui

    return StaticFiles(directory=os.path.join(os.path.dirname(swagger_ui.__file__), "static"))
