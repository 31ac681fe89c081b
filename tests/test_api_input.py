"""Bad input of every kind gets a clear 4xx in the JSON error shape, never a 5xx."""

from __future__ import annotations

import io
import json
import socket
import tarfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from pyexec.api.openapi import openapi_document
from pyexec.api.protocol import MAX_HEAD_BYTES
from pyexec.store.memory import MemoryStore

from .conftest import LiveServer, app_client, live_server, make_settings
from .fakes import FakeRunner
from .tarfiles import make_tar

EXEC = "/api/v1/exec/sync"
EVAL = "/api/v1/eval"
HELLO = make_tar({"main.py": "print('hello')\n"})
DEEP = "[" * 5000


def upload(tar: bytes = HELLO, metadata: str | None = None) -> dict[str, Any]:
    files: dict[str, Any] = {"tar": ("code.tar", tar, "application/x-tar")}
    return {"files": files, "data": {} if metadata is None else {"metadata": metadata}}


def error(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(allowed_images=("*",))
    async with app_client(settings, store=MemoryStore(), runner=FakeRunner()) as client:
        yield client


@pytest.mark.anyio
@pytest.mark.parametrize("metadata", [DEEP, '{"config": ' + DEEP, '{"x": ' + "{" * 5000])
async def test_deeply_nested_metadata_is_400(api: httpx.AsyncClient, metadata: str) -> None:
    """5,000 nested brackets in the metadata part are 400 invalid_json, not a 500."""
    assert error(await api.post(EXEC, **upload(metadata=metadata))) == (400, "invalid_json")


@pytest.mark.anyio
async def test_deeply_nested_eval_body_is_400(api: httpx.AsyncClient) -> None:
    """The same depth in an eval body is 400 invalid_json."""
    response = await api.post(EVAL, content=DEEP, headers={"content-type": "application/json"})
    assert error(response) == (400, "invalid_json")


@pytest.mark.anyio
@pytest.mark.parametrize("image", ["Bad Image!", "../../etc:passwd", "x/y@sha256:zz"])
async def test_invalid_image_reference_is_400(api: httpx.AsyncClient, image: str) -> None:
    """A malformed docker_image is 400 invalid_image at parse time (any image is allowed here)."""
    response = await api.post(EXEC, **upload(metadata=f'{{"docker_image": "{image}"}}'))
    assert error(response) == (400, "invalid_image")


def clash_tar(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("main.py"), io.BytesIO(b""))
        for name, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "members",
    [
        (("a", tarfile.DIRTYPE), ("a", tarfile.REGTYPE)),
        (("a", tarfile.REGTYPE), ("a", tarfile.DIRTYPE)),
        (("a", tarfile.REGTYPE), ("a/b", tarfile.REGTYPE)),
        (("a/b", tarfile.REGTYPE), ("a", tarfile.REGTYPE)),
    ],
    ids=["dir-then-file", "file-then-dir", "file-then-child", "child-then-file"],
)
async def test_a_directory_and_a_file_of_one_name_are_400_at_upload(
    api: httpx.AsyncClient, members: tuple[tuple[str, bytes], ...]
) -> None:
    """A path that is both a directory and a file is refused at upload: 400 tar_name_clash."""
    assert error(await api.post(EXEC, **upload(clash_tar(*members)))) == (400, "tar_name_clash")


@pytest.mark.anyio
@pytest.mark.parametrize("wait", ["61", "60.5", "-1", "nan", "inf", "soon", "1e9"])
async def test_out_of_range_wait_is_refused(api: httpx.AsyncClient, wait: str) -> None:
    """?wait= outside 0..60 (its documented range) is 400 invalid_query, never clamped."""
    done = await api.post(EXEC, **upload())
    execution_id = done.json()["execution_id"]
    response = await api.get(f"/api/v1/executions/{execution_id}", params={"wait": wait})
    assert error(response) == (400, "invalid_query")
    assert response.json()["error"]["details"]["field"] == "wait"


@pytest.mark.anyio
@pytest.mark.parametrize("wait", ["0", "60", "0.5"])
async def test_wait_within_its_range_is_served(api: httpx.AsyncClient, wait: str) -> None:
    """The documented range itself is accepted (a finished run answers at once)."""
    execution_id = (await api.post(EXEC, **upload())).json()["execution_id"]
    response = await api.get(f"/api/v1/executions/{execution_id}", params={"wait": wait})
    assert response.status_code == 200


def documented_methods() -> dict[str, set[str]]:
    paths = openapi_document()["paths"]
    return {path: {m.upper() for m in ops} for path, ops in paths.items()}


@pytest.mark.anyio
@pytest.mark.parametrize("path", sorted(documented_methods()))
async def test_405_carries_allow_with_every_method_of_the_path(
    api: httpx.AsyncClient, path: str
) -> None:
    """A method a path does not have is 405 in the JSON shape, with Allow naming its methods."""
    methods = documented_methods()[path]
    concrete = path.replace("{execution_id}", "exe_00000000-0000-0000-0000-000000000000")
    wrong = next(m for m in ("PUT", "PATCH", "POST") if m not in methods)
    response = await api.request(wrong, concrete)
    assert error(response) == (405, "method_not_allowed")
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert allowed - {"HEAD"} == methods


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(make_settings(), store=MemoryStore(), runner=FakeRunner()) as live:
        yield live


def raw_request(server: LiveServer, head: bytes) -> tuple[bytes, bytes]:
    """Send ``head`` on a fresh connection; the status line and body of the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    answer = b"".join(chunks)
    status, _, rest = answer.partition(b"\r\n")
    return status, rest.partition(b"\r\n\r\n")[2]


def test_oversized_headers_answer_431_in_the_json_shape(server: LiveServer) -> None:
    """Headers past the server's limit get 431 headers_too_large as JSON, not plain text."""
    response = httpx.get(f"{server.url}/health", headers={"X-Big": "x" * (MAX_HEAD_BYTES + 1)})
    assert response.status_code == 431
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "headers_too_large"


def test_a_head_the_parser_gives_up_on_answers_431_in_the_json_shape(
    server: LiveServer,
) -> None:
    """A head still growing past the parser's buffer gets the same JSON 431 from the protocol."""
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"x" * (MAX_HEAD_BYTES + 40_000)
    status, body = raw_request(server, head)  # never finished: the parser must give up
    assert status.split()[1] == b"431"
    assert b'"headers_too_large"' in body


def test_headers_within_the_limit_are_served(server: LiveServer) -> None:
    """Large but allowed headers (beyond h11's 16 KiB default) reach the app."""
    response = httpx.get(f"{server.url}/health/live", headers={"X-Big": "x" * 32_000})
    assert response.status_code == 200


def test_a_malformed_request_line_answers_400_in_the_json_shape(server: LiveServer) -> None:
    """Bytes that are not HTTP get 400 bad_http_request as JSON."""
    status, body = raw_request(server, b"NOT HTTP AT ALL\r\n\r\n")
    assert status.split()[1] == b"400"
    assert b'"bad_http_request"' in body


@pytest.fixture
async def closed_api() -> AsyncIterator[httpx.AsyncClient]:
    """A server on the default (closed) network policy."""
    settings = make_settings()
    assert not settings.allow_network
    assert not settings.setup_network
    async with app_client(settings, store=MemoryStore(), runner=FakeRunner()) as client:
        yield client


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "body", "code"),
    [
        (EXEC, {"config": {"network_disabled": False}}, "network_not_allowed"),
        (EXEC, {"requirements_txt": "six"}, "setup_network_unavailable"),
        (EVAL, {"code": "1", "config": {"network_disabled": False}}, "network_not_allowed"),
        (EVAL, {"code": "1", "requirements_txt": "six"}, "setup_network_unavailable"),
        (EVAL, {"code": "1", "auto_requirements": True}, "setup_network_unavailable"),
    ],
    ids=["exec-network", "exec-requirements", "eval-network", "eval-requirements", "eval-auto"],
)
async def test_network_the_server_does_not_allow_is_refused(
    closed_api: httpx.AsyncClient, path: str, body: dict[str, Any], code: str
) -> None:
    """Asking for network the server does not give is a 400 with a stable code, never a
    run without it."""
    if path == EXEC:
        response = await closed_api.post(path, **upload(metadata=json.dumps(body)))
    else:
        response = await closed_api.post(path, json=body)
    assert error(response) == (400, code)
    assert "network" in response.json()["error"]["message"]


@pytest.mark.anyio
async def test_the_served_document_is_narrowed_to_this_server(
    closed_api: httpx.AsyncClient,
) -> None:
    """/openapi.json states this server's maxima, images, python versions and network policy."""
    document = (await closed_api.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    settings = closed_api.app.state.service.settings  # type: ignore[attr-defined]
    config = schemas["Config"]["properties"]
    assert config["timeout_seconds"]["maximum"] == settings.max_timeout
    assert config["memory_mb"] == {
        "type": "integer",
        "minimum": 16,
        "maximum": settings.max_memory_mb,
    }
    assert config["network_disabled"]["const"] is True
    images = schemas["ExecutionMetadata"]["properties"]["docker_image"]["enum"]
    assert images == sorted({settings.default_image, *dict(settings.python_images).values()})
    versions = schemas["EvalRequest"]["properties"]["python_version"]["enum"]
    assert versions == [v for v, _ in settings.python_images]
    assert schemas["EvalRequest"]["properties"]["auto_requirements"]["const"] is False
    assert (
        "maximum"
        not in openapi_document()["components"]["schemas"]["Config"]["properties"]["memory_mb"]
    )
