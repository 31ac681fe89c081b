"""Live output from real runs: the local Docker runner, and a second replica over Consul.

The programs print the time of each print; the test compares it with the arrival of
the event (one host, one clock), so no sleep of the test's own decides anything.
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyexec.client import Client, EndEvent, OutputEvent, StatusEvent
from pyexec.settings import Settings
from pyexec.store.consul import ConsulStore

from . import fixtures_consul
from .conftest import LiveServer, live_server, make_settings
from .fakes import FakeRunner
from .streaming import (
    EXPECTED_LINES,
    FIRST_EVENT_LAG,
    TICKER,
    PrintingRunner,
    check_ticker,
    collect,
    printed_at,
    submit_held,
)


@pytest.mark.docker
def test_local_runner_streams_output_as_printed_and_resumes_exactly() -> None:
    """Local Docker: the first line arrives within 0.5 s of its print, and a stream
    reopened mid-run with Last-Event-ID yields exactly the remaining bytes."""
    with live_server(make_settings()) as server:
        check_ticker(server.url)


@pytest.mark.docker
def test_a_finished_real_run_replays_and_ends_at_once() -> None:
    """After a real run ended, its stream replays the whole output and ends."""
    with live_server(make_settings()) as server, Client(server.url, timeout=60) as client:
        record = client.run({"main.py": "import sys\nprint('out')\nprint('err', file=sys.stderr)"})
        texts, seen = collect(client.stream(record.execution_id))
    assert texts == {"stdout": "out\n", "stderr": "err\n"}
    assert isinstance(seen[-1], EndEvent)
    assert seen[-1].execution.status.value == "completed"


# --- two replicas over one Consul -----------------------------------------------------------

consul_prefix = fixtures_consul.consul_prefix
consul_settings = fixtures_consul.consul_settings


@pytest.fixture
def replicas(consul_settings: Settings) -> Iterator[tuple[LiveServer, LiveServer, PrintingRunner]]:
    """Two services sharing one Consul prefix: the first drives runs (its runner prints on
    cue), the second only serves (its runner never gets them)."""
    settings = make_settings(
        consul_addr=consul_settings.consul_addr,
        consul_prefix=consul_settings.consul_prefix,
        output_flush_seconds=0.1,
    )
    runner = PrintingRunner()
    with (
        live_server(settings, store=ConsulStore.from_settings(settings), runner=runner) as first,
        live_server(
            settings, store=ConsulStore.from_settings(settings), runner=FakeRunner()
        ) as second,
    ):
        yield first, second, runner


@pytest.mark.consul
def test_a_second_replica_streams_a_run_the_first_drives(
    replicas: tuple[LiveServer, LiveServer, PrintingRunner],
) -> None:
    """Through the store, the other replica streams output while the run goes on, picks up
    a stream begun on the driving replica from its Last-Event-ID, and ends with it."""
    first, second, runner = replicas
    eid = submit_held(first, runner)
    with Client(first.url) as driver, Client(second.url) as other:
        for event in driver.stream(eid):
            if isinstance(event, StatusEvent) and event.execution.status.value == "running":
                break
        runner.print(eid, "stdout", b"one\n")
        on_driver = next(e for e in driver.stream(eid) if isinstance(e, OutputEvent))
        assert on_driver.text == "one\n"
        runner.print(eid, "stdout", "twö\n".encode())
        runner.print(eid, "stderr", b"err\n")
        events = other.stream(eid, last_event_id=on_driver.id)
        live: dict[str, str] = {"stdout": "", "stderr": ""}
        for event in events:
            if isinstance(event, OutputEvent):
                live[event.stream] += event.text
            if live == {"stdout": "twö\n", "stderr": "err\n"}:
                break
        assert not isinstance(event, EndEvent)  # seen while the run still runs
        runner.print(eid, "stdout", b"three\n")
        runner.end(eid)
        rest, seen = collect(events, after="9-4")
    assert rest == {"stdout": "three\n", "stderr": ""}
    assert isinstance(seen[-1], EndEvent)
    assert seen[-1].execution.stdout == "one\ntwö\nthree\n"


@pytest.mark.docker
def test_cli_run_prints_each_line_as_printed_and_passes_the_exit_code(tmp_path: Path) -> None:
    """``pyexec run`` prints the program's first line within 0.5 s of its print, while
    the program still runs, and exits with the program's exit code."""
    script = tmp_path / "main.py"
    script.write_text(TICKER + "raise SystemExit(3)\n")
    with live_server(make_settings()) as server:
        runner = subprocess.Popen(
            [sys.executable, "-m", "pyexec.cli", "--server", server.url, "run", str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert runner.stdout is not None
            readable, _, _ = select.select([runner.stdout], [], [], 60)
            assert readable, "run printed nothing"
            line = runner.stdout.readline()
            lag = time.time() - printed_at(line.decode())
            assert runner.poll() is None  # the program still runs
            out, _ = runner.communicate(timeout=60)
        finally:
            runner.kill()
    assert lag <= FIRST_EVENT_LAG, f"first line printed {lag:.3f} s after the program did"
    assert len((line + out).decode().splitlines()) == EXPECTED_LINES
    assert runner.returncode == 3


@pytest.mark.docker
@pytest.mark.consul
def test_a_second_replica_streams_a_real_run_live(consul_settings: Settings) -> None:
    """A local Docker run on one replica, streamed from another through Consul: the first
    line within 0.5 s of its print (flushes every 0.1 s here), and an exact resume."""
    settings = make_settings(
        consul_addr=consul_settings.consul_addr,
        consul_prefix=consul_settings.consul_prefix,
        output_flush_seconds=0.1,
    )
    with (
        live_server(settings) as driver,
        live_server(
            settings, store=ConsulStore.from_settings(settings), runner=FakeRunner()
        ) as other,
    ):
        check_ticker(driver.url, other.url)
