"""Reading an exec upload (multipart ``tar`` + ``metadata``) within fixed bounds.

The body is parsed as it streams in, with or without ``Content-Length``: the ``tar``
part goes to a spooled temporary file (memory up to ``SPOOL_MEMORY_BYTES``, then
disk) and reading stops at the first byte past ``max_tar_bytes`` (413
``tar_too_large``); the ``metadata`` part and any other parts share a budget of
``MAX_METADATA_BYTES`` in memory (413 ``metadata_too_large``), and part headers and
the number of parts are capped. So one request holds at most ``max_tar_bytes`` of
temporary space, whatever it sends, and nothing of a refused upload is kept.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, BinaryIO, cast

import attrs
from anyio import to_thread
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from pyexec.errors import BadRequest, PayloadTooLarge

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = ["MAX_METADATA_BYTES", "SPOOL_MEMORY_BYTES", "Upload", "read_upload"]

#: The metadata part holds stdin too, so it may be large; other parts share this budget.
MAX_METADATA_BYTES = 16 * 1024 * 1024
#: The tar stays in memory up to this size, then moves to a temporary file.
SPOOL_MEMORY_BYTES = 1024 * 1024
#: Parts in one upload (``tar``, ``metadata`` and a few a client may add and we ignore).
MAX_PARTS = 8
#: Bytes of headers one part may have.
MAX_PART_HEADER_BYTES = 16 * 1024


@attrs.define
class Upload:
    """What an upload carried: the metadata part's bytes and the spooled tar (rewound)."""

    metadata: bytes
    tar: BinaryIO

    def close(self) -> None:
        self.tar.close()


@attrs.define
class _Part:
    name: str = ""
    header_bytes: int = 0
    disposition: bytes = b""
    header_name: bytes = b""
    header_value: bytes = b""


class _Reader:
    """The parser's callbacks: they keep the bounds and sort data into the two parts."""

    def __init__(self, max_tar_bytes: int) -> None:
        self.max_tar_bytes = max_tar_bytes
        # Closed by Upload.close, or by read_upload when the upload fails.
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115
        self.tar = cast(BinaryIO, spool)
        self.pending: list[bytes] = []
        self.tar_bytes = 0
        self.has_tar = False
        self.metadata: bytearray | None = None
        self.other_bytes = 0
        self.parts = 0
        self.part = _Part()

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise BadRequest(f"an upload has at most {MAX_PARTS} parts", code="invalid_multipart")
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self.part.header_value += data[start:end]

    def _header_bytes(self, count: int) -> None:
        self.part.header_bytes += count
        if self.part.header_bytes > MAX_PART_HEADER_BYTES:
            raise BadRequest(
                f"a part's headers exceed {MAX_PART_HEADER_BYTES} bytes", code="invalid_multipart"
            )

    def on_header_end(self) -> None:
        if self.part.header_name.lower() == b"content-disposition":
            self.part.disposition = self.part.header_value
        self.part.header_name = self.part.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        name = options.get(b"name")
        if name is None:
            raise BadRequest("a multipart part has no name", code="invalid_multipart")
        self.part.name = name.decode("utf-8", "replace")
        if self.part.name == "tar":
            if self.has_tar:
                raise BadRequest("the part 'tar' appears twice", code="invalid_multipart")
            self.has_tar = True
        elif self.part.name == "metadata":
            if self.metadata is not None:
                raise BadRequest("the part 'metadata' appears twice", code="invalid_multipart")
            self.metadata = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        count = end - start
        if self.part.name == "tar":
            self.tar_bytes += count
            if self.tar_bytes > self.max_tar_bytes:
                raise PayloadTooLarge(
                    f"the tar is larger than this server takes ({self.max_tar_bytes} bytes)",
                    code="tar_too_large",
                )
            self.pending.append(data[start:end])
            return
        self.other_bytes += count
        if self.other_bytes > MAX_METADATA_BYTES:
            raise PayloadTooLarge(
                f"the metadata (and other parts) exceed {MAX_METADATA_BYTES} bytes",
                code="metadata_too_large",
            )
        if self.part.name == "metadata" and self.metadata is not None:
            self.metadata += data[start:end]

    async def flush(self) -> None:
        """Write the tar data the last chunk carried; to disk off the event loop."""
        if not self.pending:
            return
        data, self.pending = b"".join(self.pending), []
        if self.tar_bytes <= SPOOL_MEMORY_BYTES:
            self.tar.write(data)
        else:
            await to_thread.run_sync(self.tar.write, data)

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }


def _boundary(content_type: str) -> bytes:
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise BadRequest(
            "expected multipart/form-data (with a boundary) and parts 'tar' and 'metadata'",
            code="unsupported_media_type",
        )
    return boundary


async def read_upload(
    content_type: str, body: AsyncIterator[bytes], *, max_tar_bytes: int
) -> Upload:
    """Parse the multipart ``body``; raises ``BadRequest``/``PayloadTooLarge`` as soon as a
    bound is crossed, having kept nothing of it."""
    reader = _Reader(max_tar_bytes)
    try:
        parser = MultipartParser(_boundary(content_type), reader.callbacks())
        async for chunk in body:
            parser.write(chunk)
            await reader.flush()
        parser.finalize()
        await reader.flush()
        if not reader.has_tar:
            raise BadRequest("the multipart part 'tar' (a file) is missing", code="missing_tar")
        reader.tar.seek(0)
    except FormParserError as exc:
        reader.tar.close()
        raise BadRequest(
            f"the multipart body is malformed: {exc}", code="invalid_multipart"
        ) from None
    except BaseException:
        reader.tar.close()
        raise
    return Upload(metadata=bytes(reader.metadata or b"{}"), tar=reader.tar)
