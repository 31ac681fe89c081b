"""Live output on the Nomad runner: the double by default, a real agent when
PYEXEC_TEST_NOMAD_ADDR is set (``just test-nomad-real``), as in test_nomad_e2e.

The runner reads what the run task's output files in the allocation directory gained
(fs/ls + fs/readat at increasing offsets) while the task lives.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import httpx
import pytest

from pyexec.client import Client, EndEvent, OutputEvent
from pyexec.settings import Settings

from .conftest import live_server
from .streaming import TICKER, check_ticker, collect
from .test_nomad_e2e import REAL_NOMAD, settings, sim

__all__ = ["settings", "sim"]  # the fixtures, shared with test_nomad_e2e

pytestmark = [
    pytest.mark.nomad,
    pytest.mark.consul,
    pytest.mark.docker,
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <socket.socket \[closed\] fd=\d+, family=1"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture(scope="module")
def job_prefix() -> Iterator[str]:
    """This module's runner jobs (``PYEXEC_TEST_JOB_PREFIX`` names them on a shared
    agent); purged afterwards on a real agent."""
    prefix = f"{os.environ.get('PYEXEC_TEST_JOB_PREFIX', 'pyexec-test')}-{secrets.token_hex(3)}"
    yield prefix
    if REAL_NOMAD:
        with httpx.Client(base_url=REAL_NOMAD, timeout=30) as nomad:
            for stub in nomad.get("/v1/jobs", params={"prefix": prefix}).json():
                nomad.delete(f"/v1/job/{stub['ID']}", params={"purge": "true"})


def test_nomad_runner_streams_output_as_printed_and_resumes_exactly(settings: Settings) -> None:
    """Nomad: the first line arrives within 0.5 s of its print, and a stream reopened
    mid-run with Last-Event-ID yields exactly the remaining bytes."""
    with live_server(settings) as server:
        check_ticker(server.url)


#: Like the ticker, for 8 s: long enough to restart a service in the middle.
LONG_TICKER = TICKER.replace("range(15)", "range(40)")


def test_a_restarted_service_streams_the_run_it_adopts(settings: Settings) -> None:
    """After a restart the new service adopts the Nomad run and streams its output live
    again, resuming exactly from the Last-Event-ID the old one gave."""
    with live_server(settings) as first, Client(first.url, timeout=60) as client:
        eid = client.submit({"main.py": LONG_TICKER}).execution_id
        head, seen = collect(client.stream(eid), stop_when=lambda t: t["stdout"].count("\n") >= 3)
        last = [e for e in seen if isinstance(e, OutputEvent)][-1].id
    with live_server(settings) as second, Client(second.url, timeout=60) as client:
        rest, tail = collect(client.stream(eid, last_event_id=last), after=last)
    record = tail[-1].execution
    assert isinstance(tail[-1], EndEvent)
    outputs = [e for e in tail if isinstance(e, OutputEvent)]
    assert len(outputs) > 1, "the adopted run's output came only at its end"
    assert head["stdout"] + rest["stdout"] == record.stdout
    assert len(record.stdout.splitlines()) == 40
