"""Handler of ``POST /api/v1/eval``: JSON code in, the execution record out."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pyexec.errors import BadRequest, PayloadTooLarge
from pyexec.evaluate import EvalJob, parse_eval_request, prepare
from pyexec.execution_service import Admission, ExecutionService
from pyexec.settings import Settings

from .executions import idempotency_key

__all__ = ["eval_async_endpoint", "eval_endpoint", "max_body_bytes"]

#: Room for the fields besides the code (stdin above all) in a request body.
BODY_OVERHEAD_BYTES = 16 * 1024 * 1024


def max_body_bytes(settings: Settings) -> int:
    """Largest body read: the code limit with JSON's worst escaping (``\\uXXXX``, 6 bytes
    per byte) plus room for the other fields. The code limit itself is checked after decoding."""
    return 6 * settings.max_eval_code_bytes + BODY_OVERHEAD_BYTES


async def _read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:  # stop here: the rest is never read
            raise PayloadTooLarge(f"request body exceeds {limit} bytes", code="code_too_large")
        body += chunk
    return bytes(body)


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None


def _prepare(body: bytes, settings: Settings) -> EvalJob:
    return prepare(parse_eval_request(_decode(body), settings), settings)


@contextlib.asynccontextmanager
async def _job(request: Request) -> AsyncIterator[tuple[ExecutionService, EvalJob, Admission]]:
    """An in-flight slot (taken before the body is read) and the prepared job."""
    service: ExecutionService = request.app.state.service
    settings = service.settings
    limit = max_body_bytes(settings)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(
            f"request body of {length} bytes exceeds {limit}", code="code_too_large"
        )
    admission = service.admit()
    try:
        body = await _read_body(request, limit)
        # Decoding the JSON and parsing the code for imports is CPU work: off the event loop.
        yield service, await run_in_threadpool(_prepare, body, settings), admission
    finally:
        admission.release()


async def eval_endpoint(request: Request) -> Response:
    key = idempotency_key(request)
    async with _job(request) as (service, job, admission):
        record = await service.run(
            job.request,
            job.tar,
            initial=job.initial,
            postprocess=job.postprocess,
            idempotency_key=key,
            admission=admission,
        )
    body = record.to_dict()
    if job.inline_artifacts:
        body["artifacts"] = await service.inline_artifacts(record)
    return JSONResponse(body)


async def eval_async_endpoint(request: Request) -> Response:
    """Like ``eval_endpoint``, but answers 202 with the id at once (poll or kill it)."""
    key = idempotency_key(request)
    async with _job(request) as (service, job, admission):
        record = await service.submit(
            job.request,
            job.tar,
            initial=job.initial,
            postprocess=job.postprocess,
            idempotency_key=key,
            admission=admission,
        )
    return JSONResponse(
        {"execution_id": record.execution_id, "status": record.status.value},
        status_code=202,
        headers={"Location": f"/api/v1/executions/{record.execution_id}"},
    )
