"""The attach connection of a local container: Docker's multiplexed stream, read
without threads, and the capped capture of what it carries."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator
from typing import Any

import anyio

from pyexec.errors import BackendError

__all__ = ["AttachSocket", "Capture", "Demux", "cut_partial_utf8"]

_RECV = 64 * 1024
_MUX_HEADER = struct.Struct(">BxxxL")  # stream (1 stdout, 2 stderr), 3 pad bytes, length


class Capture:
    """One output stream, kept up to ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> bool:
        """Keep ``chunk``; ``False`` once the stream went over its limit."""
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.data += chunk[: max(room, 0)]
            self.truncated = True
            return False
        self.data += chunk
        return True

    def text(self, *, final: bool = True) -> str:
        data = bytes(self.data)
        if self.truncated or not final:
            data = cut_partial_utf8(data)
        return data.decode("utf-8", errors="replace")


def cut_partial_utf8(data: bytes) -> bytes:
    """Drop a multibyte character cut off at the end (by the cap, or not yet complete)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        needed = (
            2
            if byte >> 5 == 0b110
            else 3
            if byte >> 4 == 0b1110
            else 4
            if byte >> 3 == 0b11110
            else 1
        )
        return data[:-back] if back < needed else data
    return data


class Demux:
    """Docker's multiplexed attach stream (tty off), parsed as it arrives."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._stream = 0
        self._left = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        view = memoryview(data)
        while view:
            if not self._left:
                need = _MUX_HEADER.size - len(self._header)
                self._header += view[:need]
                view = view[need:]
                if len(self._header) == _MUX_HEADER.size:
                    self._stream, self._left = _MUX_HEADER.unpack(self._header)
                    self._header.clear()
                continue
            piece = view[: self._left]
            view = view[len(piece) :]
            self._left -= len(piece)
            yield self._stream, bytes(piece)


class AttachSocket:
    """The attach connection, non-blocking, driven by the event loop."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle  # keeps docker-py's wrapper (and its response) alive
        raw = getattr(handle, "_sock", handle)
        if not isinstance(raw, socket.socket):
            raise BackendError(
                "this Docker connection type does not give a socket to attach to",
                code="runner_error",
            )
        self.sock = raw
        self.sock.setblocking(False)

    async def recv(self) -> bytes:
        while True:
            try:
                return self.sock.recv(_RECV)
            except (BlockingIOError, ssl.SSLWantReadError):
                await anyio.wait_readable(self.sock)
            except (ConnectionResetError, BrokenPipeError):
                return b""

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except (BlockingIOError, ssl.SSLWantWriteError):
                await anyio.wait_writable(self.sock)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        close = getattr(self._handle, "close", None)
        if close is not None:
            close()
