"""Helpers of the live output tests: a runner double that prints on cue, stream
collectors, a proxy that drops connections, and the timed ticker check."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import httpx

from pyexec.client import Client, EndEvent, OutputEvent, StatusEvent
from pyexec.models import Reason, RunOutcome

from .conftest import LiveServer
from .fakes import FakeRunner


class PrintingRunner(FakeRunner):
    """Held runs whose output the test produces (from its own thread) and that finish
    with exactly what they printed, like a real runner's outcome."""

    def __init__(self) -> None:
        super().__init__()
        self.printed: dict[str, dict[str, bytearray]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(
        self, execution: Any, request: Any, tar: Any, on_running: Any, **kw: Any
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.printed[execution.execution_id] = {"stdout": bytearray(), "stderr": bytearray()}
        await super().start(execution, request, tar, on_running, **kw)

    def print(self, execution_id: str, stream: str, data: bytes) -> None:
        assert self.loop is not None
        self.printed[execution_id][stream] += data
        self.loop.call_soon_threadsafe(self.emit, execution_id, stream, data)

    def end(self, execution_id: str) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.finish, execution_id)


def hello_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"print('hi')\n"
        info = tarfile.TarInfo("main.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def submit_held(server: LiveServer, runner: PrintingRunner) -> str:
    with httpx.Client(base_url=server.url) as http:
        answer = http.post(
            "/api/v1/exec/async",
            files={"tar": ("code.tar", hello_tar())},
            data={"metadata": '{"stdin": "hold"}'},
        )
    assert answer.status_code == 202
    execution_id: str = answer.json()["execution_id"]
    runner.outcome = lambda request: _outcome_of(runner, execution_id)
    return execution_id


def _outcome_of(runner: PrintingRunner, execution_id: str) -> RunOutcome:
    out = runner.printed[execution_id]
    return RunOutcome(
        reason=Reason.EXITED,
        exit_code=0,
        stdout=bytes(out["stdout"]).decode(),
        stderr=bytes(out["stderr"]).decode(),
    )


def started(server: LiveServer, runner: PrintingRunner) -> str:
    execution_id = submit_held(server, runner)
    with Client(server.url) as client:
        for event in client.stream(execution_id):
            if isinstance(event, StatusEvent) and event.execution.status.value == "running":
                break
    return execution_id


def collect(
    events: Iterator[Any],
    stop: int | None = None,
    after: str = "0-0",
    stop_when: Callable[[dict[str, str]], bool] | None = None,
) -> tuple[dict[str, str], list[Any]]:
    """The texts of the output events (checking each starts where the last ended), and
    every event; ``after``: the position the stream resumed from; ``stop``/``stop_when``:
    stop after that many events, or once the texts so far pass the check."""
    texts = {"stdout": "", "stderr": ""}
    base = dict(zip(("stdout", "stderr"), map(int, after.split("-")), strict=True))
    seen = []
    for event in events:
        seen.append(event)
        if isinstance(event, OutputEvent):
            assert event.offset == base[event.stream] + len(texts[event.stream].encode())
            texts[event.stream] += event.text
        if stop is not None and len(seen) >= stop:
            break
        if stop_when is not None and stop_when(texts):
            break
    return texts, seen


class DroppingProxy:
    """A loopback TCP proxy whose connections the test can cut at any moment."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop(self) -> None:
        """Cut every open connection (both ends), as a broken network would."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.drop()


#: Prints ``<n> <time.time()>`` every 0.2 s for 3 s (one write per line).
TICKER = (
    "import sys, time\n"
    "for i in range(15):\n"
    "    sys.stdout.write(f'{i} {time.time()!r}\\n')\n"
    "    sys.stdout.flush()\n"
    "    time.sleep(0.2)\n"
)
EXPECTED_LINES = 15
#: The first stdout event arrives at most this long after its print.
FIRST_EVENT_LAG = 0.5


@attrs.frozen
class Arrival:
    at: float
    event: Any


def follow_timed(client: Client, execution_id: str, **kwargs: Any) -> Iterator[Arrival]:
    for event in client.stream(execution_id, **kwargs):
        yield Arrival(time.time(), event)


def printed_at(text: str) -> float:
    """The time the program printed the first line of ``text``."""
    return float(text.splitlines()[0].split()[1])


def check_ticker(server_url: str, stream_url: str | None = None) -> None:
    """The first stdout event is within FIRST_EVENT_LAG of its print; a reconnect with
    the last id mid-run yields exactly the remaining bytes. ``stream_url``: another
    replica to stream from."""
    with Client(server_url, timeout=60) as submitter:
        eid = submitter.submit({"main.py": TICKER}).execution_id
    with Client(stream_url or server_url, timeout=60) as client:
        first_part: list[Arrival] = []
        for arrival in follow_timed(client, eid):
            first_part.append(arrival)
            outputs = [a for a in first_part if isinstance(a.event, OutputEvent)]
            if sum(a.event.text.count("\n") for a in outputs) >= 3:
                break
        assert not any(isinstance(a.event, EndEvent) for a in first_part)
        kinds = [type(a.event) for a in first_part]
        assert kinds[0] is StatusEvent
        first = next(a for a in first_part if isinstance(a.event, OutputEvent))
        assert first.event.offset == 0
        lag = first.at - printed_at(first.event.text)
        print(f"first stdout event {lag * 1000:.0f} ms after its print")  # shown with -s
        assert lag <= FIRST_EVENT_LAG, f"first stdout event {lag:.3f} s after its print"
        last_id = [a.event for a in first_part if isinstance(a.event, OutputEvent)][-1].id
        head = "".join(a.event.text for a in first_part if isinstance(a.event, OutputEvent))
        rest, tail = collect(
            (a.event for a in follow_timed(client, eid, last_event_id=last_id)), after=last_id
        )
        assert isinstance(tail[-1], EndEvent)
        record = tail[-1].execution
    assert record.exit_code == 0, record.stderr
    assert head + rest["stdout"] == record.stdout
    assert len(record.stdout.splitlines()) == EXPECTED_LINES
    assert rest["stdout"], "the reconnect came after the run had printed everything"
