"""The host side of the bootstrap's protocol (see ``bootstrap.py`` for the format).

What a runner writes to a sandbox's stdin (the spec, the archive as checked member
frames, the end mark) and how it reads the control line back. The tar is parsed
here, with ``tarfile``, so the bootstrap inside the container needs nothing but
built-in modules.
"""

from __future__ import annotations

import marshal
import struct
import tarfile
from collections.abc import Callable
from typing import Any

from pyexec.sandbox.tarcheck import FILE
from pyexec.tarsafe import member_kind

__all__ = ["END", "ControlLine", "Trailer", "encode_archive", "frame", "spec_frame"]

_LENGTH = struct.Struct(">I")
#: The empty frame that ends the archive (the request's stdin follows it).
END = _LENGTH.pack(0)
CONTROL = b"\0pyexec "
TRAILER = b"\0pyexec end "
_TRAILER_MAX = 64
_CONTROL_MAX = 64 * 1024
_CHUNK = 256 * 1024
#: Readable by every Python 3.4+ inside whatever image a request names.
_MARSHAL_VERSION = 4


def frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def spec_frame(spec: dict[str, Any]) -> bytes:
    """The first frame: what the bootstrap is told to do (marshal: built in, no imports)."""
    return frame(marshal.dumps(spec, _MARSHAL_VERSION))


class _ChunkReader:
    """Chunks from a callable as a file object for tarfile's stream mode."""

    def __init__(self, next_chunk: Callable[[], bytes]) -> None:
        self._next = next_chunk
        self._buf = b""
        self._eof = False

    def read(self, size: int = -1) -> bytes:
        while not self._buf and not self._eof:
            self._buf = self._next()
            self._eof = not self._buf
        if size < 0:
            size = len(self._buf)
        out, self._buf = self._buf[:size], self._buf[size:]
        return out


def encode_archive(next_chunk: Callable[[], bytes], send: Callable[[bytes], None]) -> None:
    """Parse the tar whose bytes ``next_chunk`` returns (``b""`` at the end) and ``send``
    its members as frames, in pieces of about 256 KiB. Blocking: run it in a thread."""
    out = bytearray()

    def put(data: bytes) -> None:
        out.extend(_LENGTH.pack(len(data)))
        out.extend(data)
        if len(out) >= _CHUNK:
            send(bytes(out))
            out.clear()

    # Stream mode only ever calls read(); typeshed asks for a full file object.
    reader: Any = _ChunkReader(next_chunk)
    with tarfile.open(fileobj=reader, mode="r|", bufsize=64 * 1024) as archive:
        while (member := archive.next()) is not None:
            kind = member_kind(member)
            size = member.size if kind == FILE else 0
            header = (kind, member.name, member.mode, member.linkname, size)
            put(marshal.dumps(header, _MARSHAL_VERSION))
            data = archive.extractfile(member) if size else None
            while data is not None and (chunk := data.read(_CHUNK)):
                put(chunk)
            archive.members.clear()  # type: ignore[attr-defined]  # tarfile keeps them all
    if out:
        send(bytes(out))


class ControlLine:
    """The bootstrap's control line at the start of stdout: ``\\0pyexec <status> <message>``."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.status: str | None = None
        self.message = ""

    @property
    def done(self) -> bool:
        return self.status is not None

    def feed(self, data: bytes) -> bytes:
        """Consume the control line from ``data``; returns what follows it."""
        if self.done:
            return data
        end = data.find(b"\n")
        if end < 0:
            self._buf += data
            if len(self._buf) > _CONTROL_MAX:
                self.status, self.message = "error", "the sandbox bootstrap misbehaved"
            return b""
        self._buf += data[:end]
        line = bytes(self._buf)
        if line.startswith(CONTROL):
            status, _, message = line[len(CONTROL) :].decode("utf-8", "replace").partition(" ")
            self.status, self.message = status, message
        else:
            self.status, self.message = "error", "the sandbox bootstrap misbehaved"
        return data[end + 1 :]


class Trailer:
    """The bootstrap's last line on stderr, ``\\0pyexec end <kind> <code>``, split from
    the program's own stderr as it streams by.

    Bytes that may begin the trailer are held back until more arrive; only a trailer
    the stream ends with counts (a program printing one earlier prints text). After
    ``finish``, ``kind`` is ``"exit"``, ``"timeout"`` or ``"stopped"`` and ``code`` the
    exit code, or both ``None``: the sandbox was killed from outside before its
    bootstrap could say.
    """

    def __init__(self) -> None:
        self._held = b""
        self.kind: str | None = None
        self.code: int | None = None

    def feed(self, data: bytes) -> bytes:
        """The program's stderr in ``data`` (with what was held before); holds the rest."""
        buf = self._held + data
        start = buf.rfind(b"\0")
        if start >= 0 and _may_be_trailer(buf[start:]):
            self._held = buf[start:]
            return buf[:start]
        self._held = b""
        return buf

    def finish(self) -> bytes:
        """At the end of the stream: parse the trailer; returns held bytes that were not one."""
        held, self._held = self._held, b""
        kind, _, code = held[len(TRAILER) : -1].decode("ascii", "replace").partition(" ")
        if held.startswith(TRAILER) and held.endswith(b"\n") and code.isdigit():
            self.kind, self.code = kind, int(code)
            return b""
        return held


def _may_be_trailer(tail: bytes) -> bool:
    if len(tail) > _TRAILER_MAX:
        return False
    if len(tail) <= len(TRAILER):
        return TRAILER.startswith(tail)
    return tail.startswith(TRAILER) and b"\n" not in tail[:-1]
