"""Handlers of the tar API: ``/api/v1/exec/{sync,async}`` and ``/api/v1/executions/{id}``."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from pyexec import idempotency
from pyexec.errors import BadRequest, NotFound, PayloadTooLarge
from pyexec.execution_service import MAX_POLL_SECONDS, ExecutionService
from pyexec.models import EXECUTION_ID, ExecutionRequest, parse_request

__all__ = [
    "exec_async",
    "exec_sync",
    "execution",
    "execution_get",
    "execution_kill",
    "execution_logs",
    "idempotency_key",
]

#: The metadata part holds stdin too, so it may be larger than Starlette's 1 MiB default.
MAX_METADATA_BYTES = 16 * 1024 * 1024


def _service(request: Request) -> ExecutionService:
    service: ExecutionService = request.app.state.service
    return service


@contextlib.asynccontextmanager
async def _upload(request: Request) -> AsyncIterator[tuple[ExecutionRequest, BinaryIO]]:
    """The parsed metadata and the spooled tar; the spool is closed on exit."""
    settings = _service(request).settings
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_tar_bytes + MAX_METADATA_BYTES:
        raise PayloadTooLarge(
            f"request body of {length} bytes exceeds the limit", code="tar_too_large"
        )
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest(
            "expected multipart/form-data with parts 'tar' and 'metadata'",
            code="unsupported_media_type",
        )
    async with request.form(max_files=2, max_fields=8, max_part_size=MAX_METADATA_BYTES) as form:
        tar = form.get("tar")
        if not isinstance(tar, UploadFile):
            raise BadRequest("the multipart part 'tar' (a file) is missing", code="missing_tar")
        raw: Any = form.get("metadata") or "{}"
        if isinstance(raw, UploadFile):
            raw = await raw.read()
        yield parse_request(raw, settings), tar.file


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


def _execution_id(request: Request) -> str:
    execution_id: str = request.path_params["execution_id"]
    if not EXECUTION_ID.match(execution_id):
        raise NotFound(f"no execution {execution_id}")
    return execution_id


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header, checked (``None`` without one)."""
    return idempotency.check_key(request.headers.get(idempotency.HEADER))


async def exec_sync(request: Request) -> JSONResponse:
    key = idempotency_key(request)
    async with _upload(request) as (exec_request, tar):
        record = await _service(request).run(exec_request, tar, idempotency_key=key)
    return JSONResponse(record.to_dict())


async def exec_async(request: Request) -> JSONResponse:
    key = idempotency_key(request)
    async with _upload(request) as (exec_request, tar):
        record = await _service(request).submit(exec_request, tar, idempotency_key=key)
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
    record = await _service(request).get(_execution_id(request), wait=_wait(request))
    return JSONResponse(record.to_dict())


async def execution_logs(request: Request) -> JSONResponse:
    record, stdout, stderr = await _service(request).logs(_execution_id(request))
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
    record = await _service(request).kill(_execution_id(request))
    return JSONResponse(record.to_dict())
