"""Uploads are bounded: reading stops at the first byte past a limit, chunked or not, the
temporary space one request takes is bounded, and admission comes before the body."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyexec.api.upload import MAX_METADATA_BYTES, SPOOL_MEMORY_BYTES
from pyexec.store.memory import MemoryStore

from .conftest import LiveServer, live_server, make_settings
from .fakes import FakeRunner
from .tarfiles import make_tar

LIMIT = 2 * 1024 * 1024  # max_tar_bytes of the server under test
BOUNDARY = b"pyexec-test-boundary"
CHUNK = 64 * 1024


class TempUsage:
    """Samples, in a thread, the bytes this process holds in files under ``directory``
    (open descriptors, deleted or not: a spool is unlinked as soon as it is created)."""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        total = 0
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(self.directory):
                    total += os.stat(f"/proc/self/fd/{fd}").st_size
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.current())
            self.samples += 1

    def __enter__(self) -> TempUsage:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class RecordingSpool(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
    """A spool that remembers the largest size it reached (appended to ``spools``)."""

    def __init__(self, spools: list[RecordingSpool], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.largest = 0
        spools.append(self)

    def write(self, data: Any) -> int:
        written = super().write(data)
        self.largest = max(self.largest, self.tell())
        return written


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary files of this process go to a directory of the test's own."""
    directory = tmp_path / "spool"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
def server(runner: FakeRunner, spool_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(max_tar_bytes=LIMIT, max_in_flight=1, max_eval_code_bytes=1000)
    with live_server(settings, store=MemoryStore(), runner=runner) as live:
        yield live


def part(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--" + BOUNDARY + f"\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def stream(
    server: LiveServer, path: str, content_type: bytes, first: bytes, filler: bytes, total: int
) -> tuple[int, dict[str, Any], int]:
    """POST with chunked transfer: ``first``, then ``filler`` until ``total`` bytes or the
    server answers; returns (status, JSON body, bytes sent)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n".encode()
            + b"Content-Type: "
            + content_type
            + b"\r\n\r\n"
            + chunked(first)
        )
        sent = len(first)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunked(filler))
                sent += len(filler)
        status, body = read_response(sock)
    return status, body, sent


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """One HTTP response from ``sock``: its status and JSON body (by its Content-Length)."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {answer!r}"
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of the answer"
        body += chunk
    return int(lines[0].split()[1]), json.loads(body)


MULTIPART = b"multipart/form-data; boundary=" + BOUNDARY


def test_a_chunked_tar_past_the_limit_is_refused_within_bounded_temp_space(
    server: LiveServer, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 MiB of chunked tar against a 2 MiB limit: 413 tar_too_large, the server stops
    reading early, and its temporary files never hold more than the limit."""
    first = part("metadata") + b"{}\r\n" + part("tar", "code.tar")
    spools: list[RecordingSpool] = []
    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", functools.partial(RecordingSpool, spools))
    with TempUsage(spool_dir) as usage:
        status, body, sent = stream(
            server, "/api/v1/exec/sync", MULTIPART, first, b"\0" * CHUNK, 64 << 20
        )
    assert (status, body["error"]["code"]) == (413, "tar_too_large")
    assert LIMIT < sent < 32 << 20  # it stopped reading long before the end
    # Exact, from the spool itself: it went past memory onto disk, and no further than the
    # limit. The sampled disk usage (whatever moments it caught) stays within it too.
    largest = max(spool.largest for spool in spools)
    assert SPOOL_MEMORY_BYTES < largest <= LIMIT
    assert usage.samples > 0
    assert usage.peak <= LIMIT
    assert usage.current() == 0  # and is gone


def test_a_declared_length_past_the_limit_is_refused_before_reading(server: LiveServer) -> None:
    """A Content-Length above what an upload may hold is 413 without reading the body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /api/v1/exec/sync HTTP/1.1\r\nHost: x\r\nContent-Type: "
            + MULTIPART
            + f"\r\nContent-Length: {1 << 40}\r\n\r\n".encode()
        )
        status, body = read_response(sock)
    assert (status, body["error"]["code"]) == (413, "tar_too_large")


def test_metadata_past_its_limit_is_413(server: LiveServer) -> None:
    """The metadata part (and any other part) is bounded too: 413 metadata_too_large."""
    first = part("tar", "code.tar") + make_tar({"main.py": ""}) + b"\r\n" + part("metadata")
    status, body, sent = stream(
        server, "/api/v1/exec/sync", MULTIPART, first, b" " * CHUNK, MAX_METADATA_BYTES * 4
    )
    assert (status, body["error"]["code"]) == (413, "metadata_too_large")
    assert sent < MAX_METADATA_BYTES * 3


def test_admission_comes_before_the_body(server: LiveServer) -> None:
    """At the in-flight cap, an upload is refused with 429 before its body is read."""
    held = httpx.post(
        f"{server.url}/api/v1/exec/async",
        files={"tar": ("c.tar", make_tar({"main.py": ""}), "application/x-tar")},
        data={"metadata": json.dumps({"stdin": "hold"})},
    )
    assert held.status_code == 202
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            # Only the head and the start of a body that would be huge: the answer must come
            # without the rest.
            sock.sendall(
                b"POST /api/v1/exec/sync HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: " + MULTIPART + b"\r\n\r\n" + chunked(part("tar", "c.tar"))
            )
            status, body = read_response(sock)
        assert (status, body["error"]["code"]) == (429, "too_many_executions")
        # Eval as well.
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /api/v1/eval HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: application/json\r\n\r\n" + chunked(b'{"code": "')
            )
            status, body = read_response(sock)
        assert (status, body["error"]["code"]) == (429, "too_many_executions")
    finally:
        httpx.delete(f"{server.url}/api/v1/executions/{held.json()['execution_id']}")


def test_a_chunked_eval_body_past_the_limit_is_413(server: LiveServer) -> None:
    """Eval stops reading a chunked body at its limit: 413 code_too_large."""
    status, body, sent = stream(
        server, "/api/v1/eval", b"application/json", b'{"code": "', b"x" * CHUNK, 256 << 20
    )
    assert (status, body["error"]["code"]) == (413, "code_too_large")
    assert sent < 128 << 20


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (part("metadata") + b"{}\r\n--" + BOUNDARY + b"--\r\n", "missing_tar"),
        (
            part("tar", "a") + b"x\r\n" + part("tar", "b") + b"y\r\n--" + BOUNDARY + b"--\r\n",
            "invalid_multipart",
        ),
        (
            b"--"
            + BOUNDARY
            + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n--"
            + BOUNDARY
            + b"--\r\n",
            "invalid_multipart",
        ),
    ],
    ids=["no-tar", "two-tars", "nameless-part"],
)
def test_malformed_multipart_is_400(server: LiveServer, body: bytes, code: str) -> None:
    """A multipart body without a tar, with two, or with a nameless part is 400."""
    response = httpx.post(
        f"{server.url}/api/v1/exec/sync",
        content=body,
        headers={"content-type": MULTIPART.decode()},
    )
    assert (response.status_code, response.json()["error"]["code"]) == (400, code)


def test_a_body_that_is_not_multipart_is_400(server: LiveServer) -> None:
    """Another content type (or no boundary) is 400 unsupported_media_type."""
    for content_type in ("application/json", "multipart/form-data"):
        response = httpx.post(
            f"{server.url}/api/v1/exec/sync", content=b"{}", headers={"content-type": content_type}
        )
        assert response.json()["error"]["code"] == "unsupported_media_type"
