"""Handlers of ``/api/v1/executions/{id}/artifacts``: all of them as a tar, or one file."""

from __future__ import annotations

import mimetypes
from collections.abc import AsyncIterator
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import StreamingResponse

from pyexec.execution_service import ExecutionService

from .executions import execution_id_of

__all__ = ["artifact_file", "artifacts_tar"]

#: A file a run wrote is the requester's content, not this API's: a browser that opens
#: it must not run it as a page of this origin, nor guess another type.
_UNTRUSTED = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}


def _service(request: Request) -> ExecutionService:
    service: ExecutionService = request.app.state.service
    return service


async def _primed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``chunks`` with its first one read now, so a missing blob is a 404, not a cut stream."""
    first = await anext(chunks, b"")

    async def rest() -> AsyncIterator[bytes]:
        yield first
        async for chunk in chunks:
            yield chunk

    return rest()


async def artifacts_tar(request: Request) -> StreamingResponse:
    execution_id = execution_id_of(request)
    chunks = await _primed(await _service(request).artifacts_tar(execution_id))
    return StreamingResponse(
        chunks,
        media_type="application/x-tar",
        headers={"Content-Disposition": f'attachment; filename="{execution_id}-artifacts.tar"'},
    )


async def artifact_file(request: Request) -> StreamingResponse:
    execution_id = execution_id_of(request)
    path: str = request.path_params["path"]
    item, chunks = await _service(request).artifact(execution_id, path)
    kind, encoding = mimetypes.guess_type(item.path, strict=False)
    media_type = kind if kind and not encoding else "application/octet-stream"
    name = quote(item.path.rsplit("/", 1)[-1])
    return StreamingResponse(
        await _primed(chunks),
        media_type=media_type,
        headers={
            "Content-Length": str(item.size),
            "Content-Disposition": f"inline; filename*=UTF-8''{name}",
            "ETag": f'"{item.sha256}"',
            **_UNTRUSTED,
        },
    )
