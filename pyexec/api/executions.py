"""Handlers of the tar API: ``/api/v1/exec/{sync,async}`` and ``/api/v1/executions/{id}``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import BinaryIO

from starlette.requests import Request
from starlette.responses import JSONResponse

from pyexec import idempotency
from pyexec.errors import BadRequest, NotFound, PayloadTooLarge
from pyexec.execution_service import MAX_POLL_SECONDS, Admission, ExecutionService
from pyexec.models import EXECUTION_ID, ExecutionRequest, parse_request

from .upload import MAX_METADATA_BYTES, MAX_PART_HEADER_BYTES, MAX_PARTS, read_upload

#: Most bytes an upload may have besides the tar (a Content-Length above the sum is 413).
UPLOAD_OVERHEAD = MAX_METADATA_BYTES + MAX_PARTS * (MAX_PART_HEADER_BYTES + 1024)

__all__ = [
    "exec_async",
    "exec_sync",
    "execution",
    "execution_get",
    "execution_id_of",
    "execution_kill",
    "execution_logs",
    "idempotency_key",
]


def _service(request: Request) -> ExecutionService:
    service: ExecutionService = request.app.state.service
    return service


@contextlib.asynccontextmanager
async def _upload(
    request: Request,
) -> AsyncIterator[tuple[ExecutionRequest, BinaryIO, Admission]]:
    """An in-flight slot (taken before the body is read), the parsed metadata and the
    spooled tar; the slot is released and the spool closed on exit."""
    service = _service(request)
    settings = service.settings
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_tar_bytes + UPLOAD_OVERHEAD:
        raise PayloadTooLarge(
            f"request body of {length} bytes exceeds the limit", code="tar_too_large"
        )
    admission = service.admit()
    try:
        upload = await read_upload(
            request.headers.get("content-type", ""),
            request.stream(),
            max_tar_bytes=settings.max_tar_bytes,
        )
        try:
            yield parse_request(upload.metadata, settings), upload.tar, admission
        finally:
            upload.close()
    finally:
        admission.release()


def _wait(request: Request) -> float:
    """``?wait=`` seconds, 0 to ``MAX_POLL_SECONDS``; anything else is refused, not clamped."""
    raw = request.query_params.get("wait", "0")
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not 0 <= wait <= MAX_POLL_SECONDS:  # NaN fails too
        raise BadRequest(
            f"wait must be a number of seconds from 0 to {MAX_POLL_SECONDS:g}, got {raw[:40]!r}",
            code="invalid_query",
            field="wait",
            maximum=MAX_POLL_SECONDS,
        )
    return wait


def execution_id_of(request: Request) -> str:
    """The ``{execution_id}`` of the path, checked (``NotFound`` if it cannot be one)."""
    execution_id: str = request.path_params["execution_id"]
    if not EXECUTION_ID.match(execution_id):
        raise NotFound(f"no execution {execution_id}")
    return execution_id


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header, checked (``None`` without one)."""
    return idempotency.check_key(request.headers.get(idempotency.HEADER))


async def exec_sync(request: Request) -> JSONResponse:
    key = idempotency_key(request)
    async with _upload(request) as (exec_request, tar, admission):
        record = await _service(request).run(
            exec_request, tar, idempotency_key=key, admission=admission
        )
    return JSONResponse(record.to_dict())


async def exec_async(request: Request) -> JSONResponse:
    key = idempotency_key(request)
    async with _upload(request) as (exec_request, tar, admission):
        record = await _service(request).submit(
            exec_request, tar, idempotency_key=key, admission=admission
        )
    return JSONResponse(
        {"execution_id": record.execution_id, "status": record.status.value},
        status_code=202,
        headers={"Location": f"/api/v1/executions/{record.execution_id}"},
    )


async def execution(request: Request) -> JSONResponse:
    """``GET`` reads an execution, ``DELETE`` kills it."""
    if request.method == "DELETE":
        return await execution_kill(request)
    return await execution_get(request)


async def execution_get(request: Request) -> JSONResponse:
    record = await _service(request).get(execution_id_of(request), wait=_wait(request))
    return JSONResponse(record.to_dict())


async def execution_logs(request: Request) -> JSONResponse:
    record, stdout, stderr = await _service(request).logs(execution_id_of(request))
    return JSONResponse(
        {
            "execution_id": record.execution_id,
            "status": record.status.value,
            "stdout": stdout,
            "stderr": stderr,
            "output_truncated": record.output_truncated,
        }
    )


async def execution_kill(request: Request) -> JSONResponse:
    record = await _service(request).kill(execution_id_of(request))
    return JSONResponse(record.to_dict())
