"""The one place where errors become HTTP responses: ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pyexec.errors import PyexecError

__all__ = ["error_response", "exception_handlers"]

log = logging.getLogger("pyexec.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    **details: object,
) -> JSONResponse:
    body: dict[str, object] = {"code": code, "message": message}
    if details:
        body["details"] = details
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    if status == 429:
        extra["Retry-After"] = "1"
    return JSONResponse({"error": body}, status_code=status, headers=extra or None)


async def _pyexec_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, PyexecError)
    if exc.status_code >= 500:
        log.warning("backend error %s: %s", exc.code, exc.message)
    body = exc.to_dict()
    return error_response(exc.status_code, body["code"], body["message"], **body.get("details", {}))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    # Keep what the exception says about the answer (a 405's Allow).
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _unexpected(request: Request, exc: Exception) -> Response:
    # Never a traceback to the caller; the log has it.
    log.exception("unexpected error handling %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal error; see the server log")


exception_handlers = {
    PyexecError: _pyexec_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
