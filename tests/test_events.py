"""``GET /executions/{id}/events`` over HTTP, with a runner double that prints on cue."""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pyexec.client import AsyncClient, Client, EndEvent, OutputEvent, StatusEvent
from pyexec.client.errors import APIError
from pyexec.errors import BackendUnavailable
from pyexec.settings import Settings, SettingsError
from pyexec.store.memory import MemoryStore

from .conftest import LiveServer, app_client, live_server, make_settings
from .fakes import FakeRunner
from .streaming import DroppingProxy, PrintingRunner, collect, hello_tar, started


@pytest.fixture(scope="module")
def printing() -> Iterator[tuple[LiveServer, PrintingRunner]]:
    runner = PrintingRunner()
    settings = make_settings(max_event_subscribers=3, output_flush_seconds=0.05)
    with live_server(settings, store=MemoryStore(), runner=runner) as server:
        yield server, runner


def test_a_run_streams_status_output_and_end(printing: tuple[LiveServer, PrintingRunner]) -> None:
    """Status changes, each piece of output in order, then the final record, then the end."""
    server, runner = printing
    eid = started(server, runner)
    with Client(server.url) as client:
        events = client.stream(eid)
        first = next(events)
        assert isinstance(first, StatusEvent)
        assert first.execution.status.value == "running"
        runner.print(eid, "stdout", b"one\n")
        out = next(events)
        assert isinstance(out, OutputEvent)
        assert (out.stream, out.offset, out.text, out.id) == ("stdout", 0, "one\n", "4-0")
        runner.print(eid, "stderr", "é!\n".encode())
        err = next(events)
        assert isinstance(err, OutputEvent)
        assert (err.stream, err.text, err.id) == ("stderr", "é!\n", "4-4")
        runner.end(eid)
        end = next(events)
        assert isinstance(end, EndEvent)
        assert end.execution.stdout == "one\n"
        assert list(events) == []


def test_reconnecting_with_last_event_id_yields_exactly_the_rest(
    printing: tuple[LiveServer, PrintingRunner],
) -> None:
    """A stream reopened with the last id it got continues with no byte lost or repeated."""
    server, runner = printing
    eid = started(server, runner)
    for i in range(5):
        runner.print(eid, "stdout", f"line {i}\n".encode())
        runner.print(eid, "stderr", f"err {i}\n".encode())
    with Client(server.url) as client:
        texts, seen = collect(client.stream(eid), stop=2)  # running, then some output
        last = [e for e in seen if isinstance(e, OutputEvent)][-1]
        for i in range(5, 8):
            runner.print(eid, "stdout", f"line {i}\n".encode())
        runner.end(eid)
        rest, tail = collect(client.stream(eid, last_event_id=last.id), after=last.id)
    assert isinstance(tail[-1], EndEvent)
    assert texts["stdout"] + rest["stdout"] == "".join(f"line {i}\n" for i in range(8))
    assert texts["stderr"] + rest["stderr"] == "".join(f"err {i}\n" for i in range(5))
    assert not any(isinstance(e, StatusEvent) and e.execution.terminal for e in tail)


def test_a_finished_execution_replays_its_output_and_ends(
    printing: tuple[LiveServer, PrintingRunner],
) -> None:
    """After the end, a stream replays the whole output at once and ends with the record."""
    server, runner = printing
    eid = started(server, runner)
    runner.print(eid, "stdout", b"x" * 100_000)
    runner.print(eid, "stderr", b"bad\n")
    runner.end(eid)
    with Client(server.url) as client:
        client.wait(eid, timeout=10)
        texts, seen = collect(client.stream(eid))
    assert texts == {"stdout": "x" * 100_000, "stderr": "bad\n"}
    assert isinstance(seen[-1], EndEvent)
    assert not any(isinstance(e, StatusEvent) for e in seen)
    assert seen[-2].id == "100000-4"


def test_subscribers_past_the_cap_get_429(printing: tuple[LiveServer, PrintingRunner]) -> None:
    """The per-execution subscriber cap answers 429 ``too_many_subscribers``; a slot
    frees once a subscriber leaves."""
    server, runner = printing
    eid = started(server, runner)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        opened = []
        try:
            for _ in range(3):
                stream = http.stream("GET", f"/api/v1/executions/{eid}/events")
                response = stream.__enter__()
                opened.append(stream)
                assert response.status_code == 200
            refused = http.get(f"/api/v1/executions/{eid}/events")
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_subscribers"
        finally:
            for stream in opened:
                stream.__exit__(None, None, None)
        with Client(server.url) as client:
            events = client.stream(eid)
            assert isinstance(next(events), StatusEvent)
            events.close()
    runner.end(eid)


def test_bad_last_event_id_and_unknown_execution_are_4xx(
    printing: tuple[LiveServer, PrintingRunner],
) -> None:
    """A malformed Last-Event-ID is 400 ``invalid_last_event_id``; an unknown id is 404."""
    server, runner = printing
    eid = started(server, runner)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        bad = http.get(f"/api/v1/executions/{eid}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_last_event_id"
        missing = http.get("/api/v1/executions/exe_01a22cbc-64fd-709b-a516-837a452561f1/events")
        assert missing.status_code == 404
    with Client(server.url) as client, pytest.raises(APIError) as raised:
        next(client.stream("exe_01a22cbc-64fd-709b-a516-837a452561f1"))
    assert raised.value.status_code == 404
    runner.end(eid)


def test_the_client_reconnects_by_itself_after_a_dropped_connection(
    printing: tuple[LiveServer, PrintingRunner],
) -> None:
    """``stream()`` reopens a cut connection with Last-Event-ID: the output arrives whole."""
    server, runner = printing
    eid = started(server, runner)
    proxy = DroppingProxy(server.url)
    try:
        with Client(proxy.url) as client:
            events = client.stream(eid)
            texts = {"stdout": "", "stderr": ""}
            runner.print(eid, "stdout", b"before\n")
            for event in events:
                if isinstance(event, OutputEvent):
                    texts[event.stream] += event.text
                    break
            proxy.drop()
            runner.print(eid, "stdout", b"after\n")
            runner.end(eid)
            rest, seen = collect(events, after="7-0")
    finally:
        proxy.close()
    assert texts["stdout"] + rest["stdout"] == "before\nafter\n"
    assert isinstance(seen[-1], EndEvent)


def test_cli_follow_prints_output_live_and_exits_with_the_code(
    printing: tuple[LiveServer, PrintingRunner],
) -> None:
    """``pyexec follow`` prints each piece of output while the run goes on (stdout to
    stdout, stderr to stderr), then exits with the script's exit code."""
    server, runner = printing
    eid = started(server, runner)
    follower = subprocess.Popen(
        [sys.executable, "-m", "pyexec.cli", "--server", server.url, "follow", eid],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        runner.print(eid, "stdout", b"first\n")
        readable, _, _ = select.select([follower.stdout], [], [], 20)  # a bounded wait
        assert readable, "follow printed nothing while the run went on"
        assert follower.stdout.readline() == b"first\n"
        runner.print(eid, "stderr", b"oops\n")
        runner.print(eid, "stdout", b"second\n")
        runner.end(eid)
        out, err = follower.communicate(timeout=20)
    finally:
        follower.kill()
    assert out == b"second\n"
    assert b"oops\n" in err
    assert follower.returncode == 0


def test_cli_json_prints_one_event_per_line(printing: tuple[LiveServer, PrintingRunner]) -> None:
    """``pyexec --json follow`` prints each event as one JSON line, the end last."""
    server, runner = printing
    eid = started(server, runner)
    runner.print(eid, "stdout", b"a\n")
    runner.end(eid)
    done = subprocess.run(
        [sys.executable, "-m", "pyexec.cli", "--server", server.url, "--json", "follow", eid],
        capture_output=True,
        timeout=30,
        check=False,
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0] == {"event": "stdout", "id": "2-0", "offset": 0, "text": "a\n"}
    assert events[-1]["event"] == "end"
    assert events[-1]["execution"]["stdout"] == "a\n"
    assert done.returncode == 0


@pytest.mark.parametrize("cut", [1, 3, 7, 20])
def test_an_eval_runs_report_line_never_reaches_live_stderr(cut: int) -> None:
    """Live stderr of an eval run stops before the report mark, however the pieces fall;
    stdout passes unchanged."""
    from pyexec.evaluate.outcome import hide_report
    from pyexec.evaluate.wrapper import REPORT_MARK

    got: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    def forward(stream: str, data: bytes) -> None:
        got[stream] += data

    on_output = hide_report(forward)
    stderr = f"warn\n\n{REPORT_MARK}{{'result': '10'}}\n".encode()
    for i in range(0, len(stderr), cut):
        on_output("stderr", stderr[i : i + cut])
        on_output("stdout", b"o")
    assert got["stderr"] == b"warn\n"
    assert got["stdout"] == b"o" * len(range(0, len(stderr), cut))


def test_a_subscriber_that_stops_reading_stalls_nothing(
    printing: tuple[LiveServer, PrintingRunner],
) -> None:
    """A client that never reads its stream only fills its own socket: the run ends and
    every other subscriber gets all of the output and the end."""
    server, runner = printing
    eid = started(server, runner)
    host, port = server.url.removeprefix("http://").split(":")
    stuck = socket.create_connection((host, int(port)))
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(f"GET /api/v1/executions/{eid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        piece = b"y" * 65536
        for _ in range(64):  # 4 MiB, far more than the stuck socket's buffers hold
            runner.print(eid, "stdout", piece)
        runner.end(eid)
        with Client(server.url, timeout=30) as client:
            assert client.wait(eid, timeout=30).status.value == "completed"
            texts, seen = collect(client.stream(eid))
    finally:
        stuck.close()
    assert texts["stdout"] == "y" * (64 * 65536)
    assert isinstance(seen[-1], EndEvent)


def test_cli_follow_survives_a_dropped_connection(
    printing: tuple[LiveServer, PrintingRunner],
) -> None:
    """``pyexec follow`` through a connection that breaks mid-run still prints every
    byte once, in order."""
    server, runner = printing
    eid = started(server, runner)
    proxy = DroppingProxy(server.url)
    follower = subprocess.Popen(
        [sys.executable, "-m", "pyexec.cli", "--server", proxy.url, "follow", eid],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None
        runner.print(eid, "stdout", b"before\n")
        readable, _, _ = select.select([follower.stdout], [], [], 20)
        assert readable, "follow printed nothing while the run went on"
        assert follower.stdout.readline() == b"before\n"
        proxy.drop()
        runner.print(eid, "stdout", b"after\n")
        runner.end(eid)
        out, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
        proxy.close()
    assert out == b"after\n"
    assert follower.returncode == 0


@pytest.mark.anyio
async def test_the_async_client_streams_too(printing: tuple[LiveServer, PrintingRunner]) -> None:
    """``AsyncClient.stream`` yields the same typed events as the blocking twin."""
    server, runner = printing
    eid = started(server, runner)
    runner.print(eid, "stdout", b"async\n")
    runner.end(eid)
    async with AsyncClient(server.url) as client:
        events = [event async for event in client.stream(eid)]
    outputs = [e for e in events if isinstance(e, OutputEvent)]
    assert [(e.text, e.id) for e in outputs] == [("async\n", "6-0")]
    assert isinstance(events[-1], EndEvent)


def test_the_stream_needs_a_token_like_every_endpoint() -> None:
    """With API tokens set, /events answers 401 without one and streams with one."""
    runner = PrintingRunner()
    settings = make_settings(api_tokens=("s3cret",))
    with live_server(settings, store=MemoryStore(), runner=runner) as server:
        with Client(server.url, token="s3cret") as client:
            eid = client.submit({"main.py": ""}).execution_id
            client.wait(eid, timeout=10)
            assert isinstance(list(client.stream(eid))[-1], EndEvent)
        anonymous = httpx.get(f"{server.url}/api/v1/executions/{eid}/events", timeout=10)
    assert anonymous.status_code == 401


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("PYEXEC_OUTPUT_FLUSH_SECONDS", "0"),
        ("PYEXEC_OUTPUT_FLUSH_SECONDS", "nan"),
        ("PYEXEC_OUTPUT_FLUSH_SECONDS", "60"),
        ("PYEXEC_MAX_EVENT_SUBSCRIBERS", "0"),
    ],
)
def test_live_output_settings_out_of_range_are_refused(env: str, value: str) -> None:
    """A flush interval outside 0.05-10 s or a subscriber cap below 1 stops the service,
    naming the variable."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env({env: value})
    assert env in info.value.message


def test_events_carry_whole_characters(printing: tuple[LiveServer, PrintingRunner]) -> None:
    """A character split between two prints, or by an event's size, arrives whole, in
    the live stream and in the replay."""
    server, runner = printing
    eid = started(server, runner)
    wide = "é" * 20_000  # 40,000 bytes: more than one event
    with Client(server.url) as client:
        events = client.stream(eid)
        assert isinstance(next(events), StatusEvent)
        runner.print(eid, "stdout", "é".encode()[:1])
        runner.print(eid, "stdout", "é".encode()[1:] + b"\n")
        first = next(events)
        assert isinstance(first, OutputEvent)
        assert first.text == "é\n"
        runner.print(eid, "stdout", wide.encode())
        runner.end(eid)
        live, _ = collect(events, after=first.id)
        replay, _ = collect(client.stream(eid))
    assert live["stdout"] == wide
    assert replay["stdout"] == "é\n" + wide
    assert "\ufffd" not in replay["stdout"]


class UnreachableOutputStore(MemoryStore):
    """A store whose live output cannot be reached (records still can)."""

    async def watch_output(self, execution_id: str, version: int, timeout: float) -> Any:
        raise BackendUnavailable("consul is gone", code="store_unavailable")


@pytest.mark.anyio
async def test_a_store_that_cannot_be_reached_at_opening_is_503() -> None:
    """Opening a stream while the store is unreachable answers 503 at once, not a hang."""
    runner = FakeRunner()
    async with app_client(make_settings(), store=UnreachableOutputStore(), runner=runner) as api:
        submitted = await api.post(
            "/api/v1/exec/async", files={"tar": ("c.tar", hello_tar())}, data={"metadata": "{}"}
        )
        eid = submitted.json()["execution_id"]
        answer = await api.get(f"/api/v1/executions/{eid}/events")
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "store_unavailable"


class FlakyOutputStore(MemoryStore):
    """A store whose first reads of live output fail, as during a short outage."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def read_output(self, execution_id: str, stream: str, offset: int, limit: int) -> bytes:
        if self.failures > 0:
            self.failures -= 1
            raise BackendUnavailable("consul is gone", code="store_unavailable")
        return await super().read_output(execution_id, stream, offset, limit)


def test_a_store_outage_mid_stream_pauses_it_and_loses_nothing() -> None:
    """Output that cannot be read from the store for a while arrives once it can, in
    order, on the same stream."""
    runner = PrintingRunner()
    store = FlakyOutputStore(failures=1)
    settings = make_settings(output_flush_seconds=0.05)
    with live_server(settings, store=store, runner=runner) as server:
        eid = started(server, runner)
        runner.print(eid, "stdout", b"stored\n")
        with Client(server.url) as client:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # bounded: until the flush took it
                if store._live.get(eid):  # the in-process store's live copy (a peek)
                    break
                time.sleep(0.02)
            events = client.stream(eid)
            assert isinstance(next(events), StatusEvent)
            runner.print(eid, "stdout", b"later\n")
            runner.end(eid)
            texts, seen = collect(events)
    assert texts["stdout"] == "stored\nlater\n"
    assert store.failures == 0
    assert isinstance(seen[-1], EndEvent)
