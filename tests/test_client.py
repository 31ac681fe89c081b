"""The client library against scripted transports: requests, parsing, errors, retries, waits.

Every behaviour is pinned for both twins (``Client`` and ``AsyncClient``) through the
``twin`` fixture, which runs the same call on either.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyexec.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    Client,
    ClientError,
    ConnectionFailed,
    Execution,
    InvalidServerURL,
    NotFoundError,
    Reason,
    RetryPolicy,
    RunOptions,
    ServerError,
    Status,
    Timeout,
    WaitTimeout,
    tar_from_mapping,
)

from .tarfiles import make_tar

Handler = Callable[[httpx.Request], httpx.Response]
EXE = "exe_00000000-0000-4000-8000-000000000000"


def record(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "execution_id": EXE,
        "status": "completed",
        "stdout": "hi\n",
        "stderr": "",
        "exit_code": 0,
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:01Z",
        "duration_ms": 1000,
        "error": None,
        "reason": "exited",
        "output_truncated": False,
        "created_at": "2026-01-01T00:00:00Z",
    }
    body.update(fields)
    return body


def error(status: int, code: str, message: str = "nope") -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message}})


class Twin:
    """Calls a client method on a fresh sync or async client over a mock transport."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(
        self,
        handler: Handler,
        method: str,
        *args: Any,
        client_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        options: dict[str, Any] = {
            "token": None,
            "retry": RetryPolicy(attempts=3, base_delay=0.0),
            **(client_kwargs or {}),
        }
        base_url = options.pop("base_url", "http://pyexec.test")
        transport = httpx.MockTransport(handler)
        if self.kind == "sync":
            with Client(base_url, transport=transport, **options) as client:
                return getattr(client, method)(*args, **kwargs)

        async def go() -> Any:
            async with AsyncClient(base_url, transport=transport, **options) as client:
                return await getattr(client, method)(*args, **kwargs)

        return asyncio.run(go())


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest) -> Twin:
    return Twin(request.param)


def multipart_parts(request: httpx.Request) -> dict[str, bytes]:
    """The parts of a multipart body, by name (enough of a parser for our two parts)."""
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    parts = {}
    for chunk in request.content.split(b"--" + boundary)[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        name = head.split(b'name="')[1].split(b'"')[0].decode()
        parts[name] = body[: -len(b"\r\n")]
    return parts


def test_run_uploads_tar_and_metadata(twin: Twin) -> None:
    """run posts the tar and only the options that are set, and parses the record."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return httpx.Response(200, json=record(exit_code=3, stdout="out"))

    tar = tar_from_mapping({"main.py": "print(1)"})
    options = RunOptions(entrypoint="main.py", timeout=5, env={"A": "1"}, args=["x"], network=True)
    result = twin(handler, "run", tar, options)
    assert isinstance(result, Execution)
    assert (result.status, result.exit_code, result.stdout) == (Status.COMPLETED, 3, "out")
    assert result.reason is Reason.EXITED
    assert result.duration_ms == 1000
    assert result.started_at is not None
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/api/v1/exec/sync")
    parts = multipart_parts(request)
    assert parts["tar"] == tar
    assert json.loads(parts["metadata"]) == {
        "entrypoint": "main.py",
        "env_vars": ["A=1"],
        "script_args": ["x"],
        "config": {"timeout_seconds": 5, "network_disabled": False},
    }


def test_submit_returns_id_and_location(twin: Twin) -> None:
    """submit posts to /exec/async and returns the id and the Location header."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/exec/async"
        return httpx.Response(
            202,
            json={"execution_id": EXE, "status": "pending"},
            headers={"Location": f"/api/v1/executions/{EXE}"},
        )

    submitted = twin(handler, "submit", {"main.py": "print(1)"})
    assert submitted.execution_id == EXE
    assert submitted.status is Status.PENDING
    assert submitted.location == f"/api/v1/executions/{EXE}"


def test_token_and_trailing_slash(twin: Twin) -> None:
    """The token goes in a Bearer header and a trailing slash on the base URL is harmless."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer s3cret"
        assert request.url.path == "/prefix/api/v1/version"
        return httpx.Response(200, json={"version": "0.1.0", "backend": "embedded"})

    version = twin(
        handler,
        "version",
        client_kwargs={"base_url": "http://pyexec.test/prefix/", "token": "s3cret"},
    )
    assert (version.version, version.backend) == ("0.1.0", "embedded")


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://host", "http://", ":::"])
@pytest.mark.parametrize("kind", [Client, AsyncClient])
def test_a_base_url_that_is_not_http_is_refused(kind: type[Client | AsyncClient], url: str) -> None:
    """A base URL without an http(s) scheme and host raises InvalidServerURL at once."""
    with pytest.raises(InvalidServerURL, match="not a server URL"):
        kind(url)


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (404, "execution_not_found", NotFoundError),
        (401, "unauthorized", AuthenticationError),
        (400, "unknown_field", APIError),
        (500, "internal_error", ServerError),
    ],
)
def test_api_errors_carry_the_server_code(
    twin: Twin, status: int, code: str, kind: type[APIError]
) -> None:
    """An error answer raises the matching APIError with the server's code and message."""
    with pytest.raises(kind) as caught:
        twin(lambda request: error(status, code, "what went wrong"), "get", EXE)
    assert (caught.value.status_code, caught.value.code) == (status, code)
    assert caught.value.message == "what went wrong"


def test_non_json_error_is_still_an_api_error(twin: Twin) -> None:
    """A proxy's HTML error page becomes an APIError with an http_<status> code."""
    with pytest.raises(NotFoundError) as caught:
        twin(lambda request: httpx.Response(404, text="<h1>Not here</h1>"), "get", EXE)
    assert caught.value.code == "http_404"


def test_connection_refused_is_retried_then_reported(twin: Twin) -> None:
    """A refused connection is retried up to the limit, then raises ConnectionFailed."""
    attempts = []

    def handler(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with pytest.raises(ConnectionFailed, match="connection refused"):
        twin(handler, "run", {"main.py": "print(1)"})
    assert len(attempts) == 3


def test_reads_retry_503_and_submits_resend_their_key(twin: Twin) -> None:
    """A 503 is retried for a GET; a submit is resent only with its own Idempotency-Key."""
    answers = iter([error(503, "store_unavailable"), httpx.Response(200, json=record())])
    assert twin(lambda request: next(answers), "get", EXE).status is Status.COMPLETED

    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        return error(503, "runner_unavailable")

    for method, source in (("run", {"main.py": "print(1)"}), ("submit_eval", "1"), ("eval", "1")):
        posts.clear()
        with pytest.raises(ServerError) as caught:
            twin(handler, method, source)
        assert caught.value.code == "runner_unavailable"
        keys = {post.headers["Idempotency-Key"] for post in posts}
        assert (len(posts), len(keys)) == (3, 1), method
    # Another call is another request: another key.
    first = posts[0].headers["Idempotency-Key"]
    posts.clear()
    with pytest.raises(ServerError):
        twin(handler, "submit", {"main.py": "print(1)"})
    assert posts[0].headers["Idempotency-Key"] != first


def test_retry_gives_up_after_the_limit(twin: Twin) -> None:
    """A read that keeps failing with 502 stops after the attempts allowed."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return error(502, "store_error")

    with pytest.raises(ServerError):
        twin(handler, "logs", EXE)
    assert len(calls) == 3


def test_upload_from_file_is_rewound_for_a_retry(twin: Twin) -> None:
    """A file upload retried after a refused connection sends the whole tar again."""
    tar = tar_from_mapping({"main.py": "print(1)"})
    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        bodies.append(multipart_parts(request)["tar"])
        if len(bodies) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json=record())

    twin(handler, "run", io.BytesIO(tar))
    assert bodies == [tar, tar]


class _DroppedBody(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body whose connection breaks after ``head``."""

    def __init__(self, head: bytes) -> None:
        self.head = head

    def __iter__(self) -> Iterator[bytes]:
        yield self.head
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


def test_an_artifacts_download_is_retried_after_a_dropped_connection(
    twin: Twin, tmp_path: Path
) -> None:
    """download_artifacts starts again after the connection broke mid-body and after a 503,
    and writes each file once, whole; past the retry limit it raises."""
    tar = make_tar({"out/a.bin": bytes(range(256)) * 64, "b.csv": "x,y\n"})
    answers = iter(
        [
            httpx.Response(200, stream=_DroppedBody(tar[: len(tar) // 2])),
            error(503, "store_unavailable"),
            httpx.Response(200, content=tar),
        ]
    )
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return next(answers)

    written = twin(handler, "download_artifacts", EXE, tmp_path / "got")
    assert len(calls) == 3
    assert {path.relative_to(tmp_path / "got").as_posix() for path in written} == {
        "out/a.bin",
        "b.csv",
    }
    assert (tmp_path / "got" / "out" / "a.bin").read_bytes() == bytes(range(256)) * 64
    assert (tmp_path / "got" / "b.csv").read_text() == "x,y\n"

    def dropping(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=_DroppedBody(tar[:100]))

    with pytest.raises(ClientError):
        twin(dropping, "download_artifacts", EXE, tmp_path / "never")


def test_read_timeout_raises_timeout(twin: Twin) -> None:
    """A server that does not answer in time raises Timeout, not a transport error."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(Timeout):
        twin(handler, "run", {"main.py": "print(1)"})


def test_wait_long_polls_until_terminal(twin: Twin) -> None:
    """wait asks the server to long-poll and returns the first terminal record."""
    waits = []
    answers = iter(
        [record(status="running", exit_code=None, reason=None), record(status="completed")]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        waits.append(request.url.params.get("wait"))
        return httpx.Response(200, json=next(answers))

    result = twin(handler, "wait", EXE, timeout=10)
    assert result.status is Status.COMPLETED
    assert waits[0] is not None
    assert int(waits[0]) > 0
    assert len(waits) == 2


def test_wait_is_bounded(twin: Twin) -> None:
    """wait raises WaitTimeout carrying the last record once its deadline passes."""
    running = record(status="running", exit_code=None, reason=None)
    with pytest.raises(WaitTimeout) as caught:
        twin(lambda request: httpx.Response(200, json=running), "wait", EXE, timeout=0.3)
    assert caught.value.execution.status is Status.RUNNING


def test_kill_and_logs(twin: Twin) -> None:
    """kill sends DELETE and parses the record; logs parses the output so far."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            return httpx.Response(200, json=record(status="killed", reason="killed"))
        assert request.url.path.endswith("/logs")
        body = {
            "execution_id": EXE,
            "status": "running",
            "stdout": "so far",
            "stderr": "",
            "output_truncated": False,
        }
        return httpx.Response(200, json=body)

    assert twin(handler, "kill", EXE).status is Status.KILLED
    logs = twin(handler, "logs", EXE)
    assert (logs.status, logs.stdout, logs.terminal) == (Status.RUNNING, "so far", False)


def test_eval_posts_json(twin: Twin) -> None:
    """eval posts code, python_version and eval_last_expr as JSON and parses the extras."""
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/eval"
        bodies.append(json.loads(request.read()))
        return httpx.Response(200, json=record(result="2", auto_requirements=[]))

    result = twin(
        handler,
        "eval",
        "1 + 1",
        python_version="3.11",
        last_expr=True,
        options=RunOptions(timeout=5, env=["A=1"]),
    )
    assert result.result == "2"
    assert result.auto_requirements == ()
    assert bodies == [
        {
            "code": "1 + 1",
            "python_version": "3.11",
            "eval_last_expr": True,
            "env_vars": ["A=1"],
            "config": {"timeout_seconds": 5},
        }
    ]


def test_eval_rejects_image_options() -> None:
    """eval refuses options it cannot honour (an image) before sending anything."""
    with Client("http://pyexec.test") as client, pytest.raises(ValueError, match="image"):
        client.eval("1", options=RunOptions(image="x"))


def test_run_options_env_forms() -> None:
    """Environment may be a mapping, KEY=value strings or pairs; all give the same metadata."""
    forms: list[Any] = [{"A": "1", "B": "x=y"}, ["A=1", "B=x=y"], [("A", "1"), ("B", "x=y")]]
    assert {tuple(RunOptions(env=f).metadata()["env_vars"]) for f in forms} == {("A=1", "B=x=y")}
    with pytest.raises(ValueError, match="KEY=value"):
        RunOptions(env=["NOVALUE"])


def test_importing_the_client_stays_light() -> None:
    """Importing pyexec, pyexec.client and pyexec.cli loads no server dependency."""
    code = (
        "import sys, pyexec, pyexec.client, pyexec.cli\n"
        "heavy = {'starlette', 'uvicorn', 'docker', 'consul', 'nomad', 'multipart'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_health_reports_a_down_backend_without_raising(twin: Twin) -> None:
    """health returns the report for 200 and for 503 alike, asking only once."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        checks = {"store": "ok", "runner": "unavailable"}
        return httpx.Response(503, json={"status": "unavailable", "checks": checks})

    report = twin(handler, "health")
    assert report["checks"]["runner"] == "unavailable"
    assert len(calls) == 1


def test_get_can_ask_the_server_to_hold(twin: Twin) -> None:
    """get(wait=N) sends ?wait=N; a plain get sends no wait at all."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.params.get("wait"))
        return httpx.Response(200, json=record())

    twin(handler, "get", EXE, wait=12)
    twin(handler, "get", EXE)
    assert seen == ["12", None]


def test_run_wait_covers_the_servers_budget() -> None:
    """A run is waited for its limit (twice with a setup phase) plus the server's slack."""
    from pyexec.client._base import run_wait
    from pyexec.deadline import SLACK_SECONDS as RUNNER_SLACK_SECONDS

    plain, setup = RunOptions(timeout=60), RunOptions(timeout=60, requirements="attrs\n")
    assert run_wait(plain) > 60 + RUNNER_SLACK_SECONDS
    assert run_wait(setup) > 2 * 60 + RUNNER_SLACK_SECONDS
    assert run_wait(RunOptions(timeout=60, pre_commands=["true"])) == run_wait(setup)
    assert run_wait(plain, setup=True) == run_wait(setup)


def test_submit_eval_posts_to_the_async_endpoint(twin: Twin) -> None:
    """submit_eval posts the same JSON to /eval/async and returns the execution id."""
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/eval/async"
        bodies.append(json.loads(request.read()))
        return httpx.Response(202, json={"execution_id": EXE, "status": "pending"})

    submitted = twin(handler, "submit_eval", "1 + 1", last_expr=True)
    assert submitted.execution_id == EXE
    assert bodies == [{"code": "1 + 1", "eval_last_expr": True}]
