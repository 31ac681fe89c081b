"""Request building and response parsing, shared by ``Client`` and ``AsyncClient``.

Nothing here does I/O: a method returns a ``Call`` to send, and the twins send it
(with the retry policy below) and hand the response back to a ``parse_*`` method.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar, cast

import attrs
import httpx

from pyexec.__about__ import __version__
from pyexec.deadline import budget_seconds
from pyexec.errors import PyexecError
from pyexec.tarsafe import safe_extract

from .archive import tar_from_mapping
from .errors import (
    APIError,
    ArchiveError,
    ClientError,
    ConnectionFailed,
    InvalidServerURL,
    Timeout,
    WaitTimeout,
    api_error_class,
)
from .models import Execution, Logs, RunOptions, ServerVersion, Status, Submitted

__all__ = [
    "DEFAULT_SERVER",
    "BaseClient",
    "Call",
    "Destination",
    "RetryPolicy",
    "Source",
    "WaitPlan",
    "body_start",
    "check_execution_id",
    "check_status",
    "download_spool",
    "retry_decision",
    "rewind",
    "run_wait",
    "translate",
]

T = TypeVar("T")

DEFAULT_SERVER = "http://localhost:8080"
API = "/api/v1"
#: What ``run``/``submit`` accept: tar bytes, an open binary tar file, or name → content.
Source = bytes | IO[bytes] | Mapping[str, str | bytes]
#: The server caps one long-poll at 60 s; ask for less so proxies do not cut us off.
LONG_POLL = 30
#: Added to a request's own waiting time to get its read timeout.
READ_MARGIN = 30.0
#: Where downloaded files go: a directory.
Destination = str | os.PathLike[str]
#: A download is kept in memory up to this size, then in a temporary file.
SPOOL_BYTES = 1024 * 1024
#: How long a sync run may take when the caller sets no timeout (the server's default cap).
DEFAULT_RUN_WAIT = 3600.0


def run_wait(options: RunOptions | None, *, setup: bool | None = None) -> float:
    """How long a client waits for a run to end before giving up.

    The server's own budget (``pyexec.deadline``: the time limit, as much again for a
    setup phase -- eval may add requirements, so it passes ``setup=True`` -- and slack),
    plus a margin of the client's own.
    """
    options = options or RunOptions()
    limit = options.timeout or DEFAULT_RUN_WAIT
    if setup is None:
        setup = bool((options.requirements or "").strip() or options.pre_commands)
    return budget_seconds(limit, setup=setup) + READ_MARGIN


@attrs.frozen(kw_only=True)
class Call:
    """One HTTP request, described."""

    method: str
    path: str
    params: Mapping[str, str] | None = None
    json: Any = None
    files: Mapping[str, Any] | None = None
    data: Mapping[str, str] | None = None
    #: Safe to resend after the server answered 502/503 or the connection broke mid-way.
    idempotent: bool = False
    #: Read timeout for this call, if it waits longer than the client's default.
    read_timeout: float | None = None
    #: The uploaded file, rewound before a retry.
    body: IO[bytes] | None = None
    headers: Mapping[str, str] | None = None


@attrs.frozen
class RetryPolicy:
    """Retries for transient failures: ``attempts`` tries in all, exponential backoff."""

    attempts: int = 3
    base_delay: float = 0.25
    max_delay: float = 2.0

    def delays(self) -> Iterator[float]:
        for attempt in range(self.attempts - 1):
            yield min(self.max_delay, self.base_delay * 2**attempt)


def _submit_once() -> dict[str, Any]:
    """What makes a submit safe to resend: a fresh ``Idempotency-Key``, kept across the
    retries of this one call, so the server runs it once however often it arrives."""
    return {"headers": {"Idempotency-Key": f"pyexec-{uuid.uuid4()}"}, "idempotent": True}


def _retryable_exception(call: Call, exc: httpx.HTTPError) -> bool:
    # Nothing reached the server when the connection could not be opened: safe for any call.
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return True
    return call.idempotent and isinstance(exc, httpx.ReadError | httpx.RemoteProtocolError)


def _retryable_response(call: Call, response: httpx.Response) -> bool:
    return call.idempotent and response.status_code in (502, 503)


def translate(exc: httpx.HTTPError, url: str) -> ClientError:
    """An httpx exception as a client error with a one-line message."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return Timeout(f"{url}: the server did not answer in time ({type(exc).__name__})")
    reason = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "refused" in reason.lower():
        reason = "connection refused"
    return ConnectionFailed(f"cannot reach the pyexec server at {url}: {reason}", url=url)


def _error_from(response: httpx.Response) -> APIError:
    code, message, details = f"http_{response.status_code}", response.reason_phrase, None
    try:
        body = response.json()
        error = body["error"]
        code, message, details = error["code"], error["message"], error.get("details")
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()
        if text:
            message = text[0][:200]
    return api_error_class(response.status_code)(
        message, status_code=response.status_code, code=code, details=details
    )


def download_spool() -> tempfile.SpooledTemporaryFile[bytes]:
    """Where a download is kept: in memory up to ``SPOOL_BYTES``, then a temporary file."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)


def check_status(response: httpx.Response) -> None:
    """Raise the error an answer of 400 or more carries (``APIError`` and its kinds)."""
    if response.status_code >= 400:
        raise _error_from(response)


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error_from(response)
    try:
        return response.json()
    except ValueError:
        raise APIError(
            f"the server sent a response that is not JSON ({response.status_code})",
            status_code=response.status_code,
            code="invalid_response",
        ) from None


class WaitPlan:
    """Polls ``GET /executions/{id}?wait=`` until the execution is terminal or ``timeout`` passes.

    The server long-polls, so most waits are one or two requests; a server that answers at
    once is polled with backoff (0.1 s doubling to 2 s).
    """

    def __init__(
        self,
        base: BaseClient,
        execution_id: str,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base = base
        self._id = execution_id
        self._clock = clock
        self._deadline = clock() + timeout
        self._timeout = timeout
        self._delay = 0.1
        self._asked = 0
        self._sent_at = 0.0

    def call(self) -> Call:
        remaining = self._deadline - self._clock()
        self._asked = max(0, min(LONG_POLL, int(remaining)))
        self._sent_at = self._clock()
        return self._base.get_call(self._id, wait=self._asked)

    def after(self, record: Execution) -> float | None:
        """``None`` when ``record`` is the answer, else how long to sleep before the next call.

        Raises ``WaitTimeout`` once the deadline has passed.
        """
        if record.terminal:
            return None
        now = self._clock()
        remaining = self._deadline - now
        if remaining <= 0:
            raise WaitTimeout(
                f"{self._id} is still {record.status.value} after {self._timeout:g}s",
                execution=record,
            )
        if now - self._sent_at >= self._asked / 2 and self._asked > 0:
            return 0.0  # the server held the request: ask again straight away
        delay, self._delay = self._delay, min(2.0, self._delay * 2)
        return min(delay, remaining)


class BaseClient:
    """Everything the sync and async clients share: configuration, requests, parsing."""

    def __init__(
        self,
        base_url: str = DEFAULT_SERVER,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.base_url = _server_url(base_url)
        self.token = token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()

    def _http_options(self) -> dict[str, Any]:
        headers = {"User-Agent": f"pyexec-client/{__version__}", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return {
            "base_url": self.base_url,
            "headers": headers,
            "timeout": httpx.Timeout(self.timeout),
            "follow_redirects": False,
        }

    def _request_args(self, call: Call) -> dict[str, Any]:
        args: dict[str, Any] = {"method": call.method, "url": call.path}
        if call.params:
            args["params"] = dict(call.params)
        if call.json is not None:
            args["json"] = call.json
        if call.files is not None:
            args["files"] = dict(call.files)
            args["data"] = dict(call.data or {})
        if call.read_timeout is not None:
            args["timeout"] = httpx.Timeout(self.timeout, read=call.read_timeout)
        if call.headers:
            args["headers"] = dict(call.headers)
        return args

    def _url(self, call: Call) -> str:
        return self.base_url + call.path

    # --- Calls -----------------------------------------------------------------------

    def _upload_call(
        self, path: str, source: Source, options: RunOptions | None, read_timeout: float | None
    ) -> Call:
        options = options or RunOptions()
        body: IO[bytes] | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            tar: Any = bytes(source)
        elif isinstance(source, Mapping):
            tar = tar_from_mapping(source)
        else:
            tar = body = source
        return Call(
            method="POST",
            path=path,
            files={"tar": ("project.tar", tar, "application/x-tar")},
            data={"metadata": json.dumps(options.metadata())},
            read_timeout=read_timeout,
            body=body,
            **_submit_once(),
        )

    def run_call(
        self, source: Source, options: RunOptions | None, wait: float | None = None
    ) -> Call:
        if wait is None:
            wait = run_wait(options)
        return self._upload_call(f"{API}/exec/sync", source, options, wait + READ_MARGIN)

    def submit_call(self, source: Source, options: RunOptions | None) -> Call:
        return self._upload_call(f"{API}/exec/async", source, options, None)

    def get_call(self, execution_id: str, wait: float = 0) -> Call:
        return Call(
            method="GET",
            path=f"{API}/executions/{_id(execution_id)}",
            params={"wait": str(int(wait))} if wait else None,
            idempotent=True,
            read_timeout=wait + READ_MARGIN if wait else None,
        )

    def logs_call(self, execution_id: str) -> Call:
        return Call(
            method="GET", path=f"{API}/executions/{_id(execution_id)}/logs", idempotent=True
        )

    def artifacts_call(self, execution_id: str) -> Call:
        """``GET /executions/{id}/artifacts``: every artifact as one tar (streamed)."""
        return Call(
            method="GET", path=f"{API}/executions/{_id(execution_id)}/artifacts", idempotent=True
        )

    def save_artifacts(self, tar: IO[bytes], dest: Destination) -> list[Path]:
        """Unpack the artifacts tar ``tar`` into ``dest`` (made if missing) with the tar
        rules of the server (``pyexec.tarsafe``): nothing is written outside ``dest``, not
        through a link already there either. Returns the files written, in tar order."""
        root = Path(dest)
        root.mkdir(parents=True, exist_ok=True)
        tar.seek(0)
        try:
            with tarfile.open(fileobj=tar, mode="r:") as archive:
                names = [m.name for m in archive.getmembers() if m.isfile()]
            tar.seek(0)
            safe_extract(cast(BinaryIO, tar), root)
        except (tarfile.TarError, PyexecError) as exc:
            raise ArchiveError(f"the artifacts could not be written to {root}: {exc}") from None
        return [root / name for name in names]

    def kill_call(self, execution_id: str) -> Call:
        # Killing is idempotent on the server: a second DELETE returns the same record.
        return Call(method="DELETE", path=f"{API}/executions/{_id(execution_id)}", idempotent=True)

    def version_call(self) -> Call:
        return Call(method="GET", path=f"{API}/version", idempotent=True)

    def health_call(self) -> Call:
        # Not retried on 503: that answer is the report.
        return Call(method="GET", path="/health")

    def eval_call(
        self,
        code: str | Mapping[str, str],
        *,
        python_version: str | None,
        last_expr: bool | None,
        auto_requirements: bool | None,
        options: RunOptions | None,
        submit: bool = False,
        inline_artifacts: bool | None = None,
    ) -> Call:
        """``POST /eval`` (wait for the record), or with ``submit`` ``/eval/async`` (the id)."""
        options = options or RunOptions()
        if options.image is not None or options.pre_commands:
            raise ValueError("eval takes python_version, not image or pre_commands")
        body: dict[str, Any] = {}
        if isinstance(code, str):
            body["code"] = code
        else:
            body["files"] = [{"name": k, "content": v} for k, v in code.items()]
        metadata = options.metadata()
        shared = ("entrypoint", "stdin", "env_vars", "script_args", "requirements_txt", "config")
        for key in (*shared, "artifacts"):
            if key in metadata:
                body[key] = metadata[key]
        extras = {
            "python_version": python_version,
            "eval_last_expr": last_expr,
            "auto_requirements": auto_requirements,
            "inline_artifacts": inline_artifacts,
        }
        body.update({k: v for k, v in extras.items() if v is not None})
        if submit:
            return Call(method="POST", path=f"{API}/eval/async", json=body, **_submit_once())
        read_timeout = run_wait(options, setup=True) + READ_MARGIN
        return Call(
            method="POST",
            path=f"{API}/eval",
            json=body,
            read_timeout=read_timeout,
            **_submit_once(),
        )

    # --- Parsing -----------------------------------------------------------------------

    def parse_execution(self, response: httpx.Response) -> Execution:
        return _parsed(response, Execution.from_json)

    def parse_submitted(self, response: httpx.Response) -> Submitted:
        return _parsed(
            response,
            lambda d: Submitted(
                execution_id=d["execution_id"],
                status=Status(d.get("status", "pending")),
                location=response.headers.get("Location"),
            ),
        )

    def parse_logs(self, response: httpx.Response) -> Logs:
        return _parsed(
            response,
            lambda d: Logs(
                execution_id=d["execution_id"],
                status=Status(d["status"]),
                stdout=d.get("stdout") or "",
                stderr=d.get("stderr") or "",
                output_truncated=bool(d.get("output_truncated", False)),
            ),
        )

    def parse_version(self, response: httpx.Response) -> ServerVersion:
        return _parsed(
            response, lambda d: ServerVersion(version=d["version"], backend=d.get("backend", ""))
        )

    def parse_health(self, response: httpx.Response) -> dict[str, Any]:
        """The health report; a 503 is a report too (a backend is down), not an error."""
        if response.status_code == 503:
            try:
                return dict(response.json())
            except ValueError:
                pass
        return dict(_json(response))


def _server_url(base_url: str) -> str:
    """``base_url`` without trailing slashes, or ``InvalidServerURL`` if it is not http(s)."""
    text = base_url.strip().rstrip("/") or DEFAULT_SERVER
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise InvalidServerURL(
            f"{base_url!r} is not a server URL; expected http://HOST[:PORT] or https://..."
        )
    return text


#: What an id may hold: ``exe_<uuid>`` from this server, nothing that changes the URL.
_ID = re.compile(r"[A-Za-z0-9_.-]+")


def _parsed(response: httpx.Response, build: Callable[[Any], T]) -> T:
    data = _json(response)
    try:
        return build(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise APIError(
            f"unexpected response from the server: {exc!r}",
            status_code=response.status_code,
            code="invalid_response",
        ) from None


def check_execution_id(execution_id: str) -> str:
    """``execution_id`` if it can be one (a single URL path segment), else ``ValueError``."""
    if not _ID.fullmatch(execution_id) or execution_id in {".", ".."}:
        raise ValueError(f"{execution_id!r} is not an execution id")
    return execution_id


_id = check_execution_id


def rewind(call: Call, start: int | None) -> None:
    """Put an uploaded file back where it started before sending it again."""
    if call.body is not None and start is not None:
        call.body.seek(start)


def body_start(call: Call) -> int | None:
    if call.body is None:
        return None
    try:
        return call.body.tell()
    except (OSError, ValueError):
        return None


def retry_decision(
    call: Call,
    delays: Iterator[float],
    *,
    exc: httpx.HTTPError | None = None,
    response: httpx.Response | None = None,
    can_rewind: bool = True,
    url: str = "",
) -> float | None:
    """How long to wait before sending ``call`` again, or ``None`` to stop retrying.

    For an exception that will not be retried, raises its ``ClientError`` form.
    """
    retryable = (
        (exc is not None and _retryable_exception(call, exc))
        or (response is not None and _retryable_response(call, response))
    ) and (call.body is None or can_rewind)
    delay = next(delays, None) if retryable else None
    if delay is None and exc is not None:
        raise translate(exc, url) from exc
    return delay
