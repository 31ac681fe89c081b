"""Structured logs: one JSON object per line, with request and execution ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import attrs
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from pyexec.api.middleware import RequestIdMiddleware
from pyexec.logs import (
    bind_execution,
    configure_logging,
    log_finished,
    log_started,
)
from pyexec.models import Execution, Reason, RunOutcome, Status, utcnow
from pyexec.settings import Settings

log = logging.getLogger("pyexec.test")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    level = logging.getLogger().level
    handler = configure_logging(Settings(log_level="DEBUG"), stream=out)
    yield out
    logging.getLogger().removeHandler(handler)
    logging.getLogger().setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def run_execution(request: Request) -> PlainTextResponse:
    with bind_execution("exe_1"):
        log.info("dispatching", extra={"backend": "embedded"})
        # A task started inside the block inherits both ids.
        await asyncio.create_task(_background())
    log.info("answered")
    return PlainTextResponse("ok")


async def _background() -> None:
    log.warning("finished in background")


def call(headers: dict[str, str]) -> httpx.Response:
    app = Starlette(routes=[Route("/run", run_execution, methods=["POST"])])

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=RequestIdMiddleware(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/run", headers=headers)

    return asyncio.run(go())


def test_every_line_is_one_json_object(stream: io.StringIO) -> None:
    """Each log line parses as JSON with ts, level, logger and message."""
    log.info("hello %s", "world", extra={"attempt": 2})
    (line,) = lines(stream)
    assert line["message"] == "hello world"
    assert line["level"] == "INFO"
    assert line["logger"] == "pyexec.test"
    assert line["attempt"] == 2
    assert str(line["ts"]).endswith("Z")


def test_exceptions_stay_on_one_line(stream: io.StringIO) -> None:
    """A traceback is a field of the one JSON line, not extra lines."""
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (line,) = lines(stream)
    assert "ValueError: boom" in str(line["exc"])


def test_execution_lines_carry_both_ids(stream: io.StringIO) -> None:
    """Lines about an execution, including a background task's, carry both ids."""
    response = call({"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    by_message = {line["message"]: line for line in lines(stream)}
    for message in ("dispatching", "finished in background"):
        assert by_message[message]["execution_id"] == "exe_1"
        assert by_message[message]["request_id"] == "req-42"
    assert by_message["dispatching"]["backend"] == "embedded"
    assert "execution_id" not in by_message["answered"]
    assert by_message["answered"]["request_id"] == "req-42"


def test_access_line_is_logged_per_request(stream: io.StringIO) -> None:
    """The middleware logs one access line with method, path, status and duration."""
    call({})
    (access,) = [line for line in lines(stream) if line["logger"] == "pyexec.http"]
    assert (access["method"], access["path"], access["status"]) == ("POST", "/run", 200)
    assert isinstance(access["duration_ms"], float)


@pytest.mark.parametrize("sent", [None, "", "bad id with spaces", "x" * 129, "a\r\nb"])
def test_unacceptable_request_ids_are_replaced(stream: io.StringIO, sent: str | None) -> None:
    """A missing or unsafe X-Request-ID is replaced by a fresh id, echoed on the response."""
    headers = {} if sent is None else {"X-Request-ID": sent}
    response = call(headers)
    echoed = response.headers["X-Request-ID"]
    assert echoed != sent
    assert len(echoed) == 32


def test_text_format_appends_ids() -> None:
    """The text format keeps the ids at the end of the line."""
    out = io.StringIO()
    level = logging.getLogger().level
    handler = configure_logging(Settings(log_format="text"), stream=out)
    try:
        with bind_execution("exe_2"):
            log.info("plain")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(level)
    assert out.getvalue().rstrip().endswith("[execution_id=exe_2]")


def test_uvicorn_colour_copies_are_dropped(stream: io.StringIO) -> None:
    """uvicorn's `color_message` (ANSI codes) does not reach the JSON line."""
    # Any logger: uvicorn's own may have had its level raised by an earlier server in-process.
    log.info("Started %s", "x", extra={"color_message": "Started \x1b[36m%s\x1b[0m"})
    (line,) = lines(stream)
    assert line["message"] == "Started x"
    assert "color_message" not in line


def test_execution_hooks_log_one_line_each_with_the_verdict(stream: io.StringIO) -> None:
    """The start and finish hooks log the execution id, status, reason and duration."""
    record = Execution(execution_id="exe_3", started_at=utcnow())
    log_started(attrs.evolve(record, status=Status.RUNNING))
    log_finished(record.finished(RunOutcome(reason=Reason.OOM, exit_code=137)))
    started, finished = lines(stream)
    assert (started["execution_id"], started["status"]) == ("exe_3", "running")
    assert finished["execution_id"] == "exe_3"
    assert (finished["status"], finished["reason"], finished["exit_code"]) == ("failed", "oom", 137)
    assert isinstance(finished["duration_ms"], int)
