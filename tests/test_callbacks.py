"""Completion callbacks against a receiver on loopback: signed, retried, bounded, allowed hosts."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import attrs
import httpx
import pytest

from pyexec.callbacks import LEASE_MARGIN, CallbackSender
from pyexec.models import (
    Execution,
    Reason,
    RunOutcome,
    Status,
    new_execution_id,
    parse_request,
    utcnow,
)
from pyexec.settings import Settings
from pyexec.store.consul import ConsulStore
from pyexec.store.memory import MemoryStore
from pyexec.webhooks import SIGNATURE_HEADER, WebhookVerificationError, sign, verify

from . import fixtures_consul
from .conftest import app_client, make_settings
from .fakes import FakeRunner
from .tarfiles import make_tar

pytestmark = pytest.mark.anyio

SECRET = "callback-test-secret"


@attrs.define
class Received:
    body: bytes
    headers: dict[str, str]


class Receiver:
    """An HTTP server on loopback that answers callbacks with scripted statuses."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[Received] = []
        self.arrived = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = outer.statuses.pop(0) if outer.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with outer.arrived:
                    outer.received.append(Received(body, dict(self.headers.items())))
                    outer.arrived.notify_all()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def wait_for(self, count: int, timeout: float = 30) -> list[Received]:
        """The callbacks received once there are ``count`` (the loop runs meanwhile)."""

        def wait() -> list[Received]:
            with self.arrived:
                assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout)
                return list(self.received)

        return await asyncio.to_thread(wait)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver([])
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
        thread.join(timeout=10)


def callback_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "callback_allowed_hosts": ("127.0.0.1",),
        "callback_secret": SECRET,
        "callback_max_seconds": 30.0,
    }
    return make_settings(**(base | overrides))


async def submit(api: httpx.AsyncClient, metadata: dict[str, Any]) -> httpx.Response:
    return await api.post(
        "/api/v1/exec/async",
        files={"tar": ("code.tar", make_tar({"main.py": "print(1)"}))},
        data={"metadata": json.dumps({"stdin": "out", **metadata})},
    )


async def callback_state(api: httpx.AsyncClient, execution_id: str, final: str) -> dict[str, Any]:
    """The record's ``callback`` once its status is ``final`` (bounded wait)."""
    deadline = time.monotonic() + 30
    while True:
        record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
        state: dict[str, Any] = record.get("callback") or {}
        if state.get("status") == final or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.05)


@pytest.fixture
async def api(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    settings = getattr(request, "param", None) or callback_settings()
    async with app_client(settings, store=MemoryStore(), runner=FakeRunner()) as client:
        yield client


async def test_delivers_the_signed_final_record(api: httpx.AsyncClient, receiver: Receiver) -> None:
    """The final record is POSTed once, with a signature pyexec.webhooks.verify accepts."""
    execution_id = (await submit(api, {"callback_url": receiver.url})).json()["execution_id"]
    (got,) = await receiver.wait_for(1)
    verify(got.body, got.headers[SIGNATURE_HEADER], SECRET)
    record = json.loads(got.body)
    assert (record["execution_id"], record["status"], record["stdout"]) == (
        execution_id,
        "completed",
        "out",
    )
    with pytest.raises(WebhookVerificationError):
        verify(got.body + b" ", got.headers[SIGNATURE_HEADER], SECRET)
    with pytest.raises(WebhookVerificationError):
        verify(got.body, got.headers[SIGNATURE_HEADER], "another secret")
    state = await callback_state(api, execution_id, "delivered")
    assert state == {"status": "delivered", "attempts": 1, "last_error": None}
    metrics = (await api.get("/metrics")).text
    assert 'pyexec_callback_attempts_total{outcome="ok"} 1.0' in metrics
    assert 'pyexec_callbacks_total{status="delivered"} 1.0' in metrics


async def test_retries_after_a_500(api: httpx.AsyncClient, receiver: Receiver) -> None:
    """A 500 answer is retried with backoff; the record shows both attempts and the error."""
    receiver.statuses = [500]
    execution_id = (await submit(api, {"callback_url": receiver.url})).json()["execution_id"]
    first, second = await receiver.wait_for(2)
    assert first.body == second.body
    state = await callback_state(api, execution_id, "delivered")
    assert state == {"status": "delivered", "attempts": 2, "last_error": None}
    metrics = (await api.get("/metrics")).text
    assert 'pyexec_callback_attempts_total{outcome="error"} 1.0' in metrics


@pytest.mark.parametrize("api", [callback_settings(callback_max_seconds=2.5)], indirect=True)
async def test_gives_up_after_the_bound(api: httpx.AsyncClient, receiver: Receiver) -> None:
    """A receiver that keeps failing is given up once the bound has passed; the record says so."""
    receiver.statuses = [500] * 100
    started = time.monotonic()
    execution_id = (await submit(api, {"callback_url": receiver.url})).json()["execution_id"]
    state = await callback_state(api, execution_id, "failed")
    assert state["status"] == "failed"
    assert state["last_error"] == "HTTP 500"
    assert state["attempts"] == len(receiver.received) >= 2
    assert time.monotonic() - started < 2.5 + 10
    metrics = (await api.get("/metrics")).text
    assert 'pyexec_callbacks_total{status="failed"} 1.0' in metrics


@pytest.mark.parametrize(
    ("settings", "url", "code"),
    [
        (make_settings(), "http://127.0.0.1:9/hook", "callback_host_not_allowed"),
        (callback_settings(), "http://example.invalid/hook", "callback_host_not_allowed"),
        (
            callback_settings(callback_allowed_hosts=("127.0.0.1:1",)),
            "http://127.0.0.1:2/",
            "callback_host_not_allowed",
        ),
        (callback_settings(), "ftp://127.0.0.1/hook", "invalid_callback_url"),
        (callback_settings(), "http://user:pw@127.0.0.1/hook", "invalid_callback_url"),
        (
            callback_settings(callback_secret=None),
            "http://127.0.0.1/hook",
            "callback_not_configured",
        ),
    ],
)
async def test_refused_at_submit(settings: Settings, url: str, code: str) -> None:
    """A callback_url the server may not call is refused with 400 before anything runs."""
    runner = FakeRunner()
    async with app_client(settings, store=MemoryStore(), runner=runner) as api:
        refused = await submit(api, {"callback_url": url})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, code)
        evaluated = await api.post("/api/v1/eval", json={"code": "1", "callback_url": url})
        assert (evaluated.status_code, evaluated.json()["error"]["code"]) == (400, code)
    assert runner.started == []


async def test_a_run_killed_by_shutdown_is_reported(receiver: Receiver) -> None:
    """A run the shutting-down service kills still gets its callback before the app exits."""
    async with app_client(callback_settings(), store=MemoryStore(), runner=FakeRunner()) as api:
        answer = await submit(api, {"callback_url": receiver.url, "stdin": "hold"})
        execution_id = answer.json()["execution_id"]
    (got,) = await receiver.wait_for(1, timeout=1)
    record = json.loads(got.body)
    assert (record["execution_id"], record["status"]) == (execution_id, "killed")


async def test_eval_takes_a_callback(api: httpx.AsyncClient, receiver: Receiver) -> None:
    """The eval API delivers its final record to callback_url too."""
    answer = await api.post("/api/v1/eval/async", json={"code": "1", "callback_url": receiver.url})
    assert answer.status_code == 202
    (got,) = await receiver.wait_for(1)
    assert json.loads(got.body)["execution_id"] == answer.json()["execution_id"]


def test_verify_recipe() -> None:
    """verify accepts what sign made, within the tolerance only, and any of several v1s."""
    header = sign(b"{}", "k", timestamp=1000)
    verify(b"{}", header, "k", now=1000 + 299)
    with pytest.raises(WebhookVerificationError, match="from now"):
        verify(b"{}", header, "k", now=1000 + 301)
    rotated = f"{header},v1={'0' * 64}"
    verify(b"{}", rotated, "k", now=1000)
    for bad in (None, "", "v1=abc", "t=1000"):
        with pytest.raises(WebhookVerificationError):
            verify(b"{}", bad, "k", now=1000)


@pytest.mark.consul
async def test_the_replica_that_ends_it_delivers(receiver: Receiver) -> None:
    """Accepted by one replica and killed through another (one Consul): the killer reports."""
    prefix = fixtures_consul.new_prefix()
    settings = callback_settings(
        consul_addr=fixtures_consul.CONSUL_ADDR, consul_prefix=prefix, callback_max_seconds=5.0
    )
    try:
        async with (
            app_client(settings, runner=FakeRunner()) as first,
            app_client(settings, runner=FakeRunner()) as second,
        ):
            answer = await submit(first, {"callback_url": receiver.url, "stdin": "hold"})
            execution_id = answer.json()["execution_id"]
            killed = await second.delete(f"/api/v1/executions/{execution_id}")
            assert killed.json()["status"] == "killed"
            (got,) = await receiver.wait_for(1)
            assert json.loads(got.body)["status"] == "killed"
            state = await callback_state(first, execution_id, "delivered")
            assert state["status"] == "delivered"
            ok = 'pyexec_callback_attempts_total{outcome="ok"} 1.0'
            assert ok in (await second.get("/metrics")).text
            assert ok not in (await first.get("/metrics")).text
        assert len(receiver.received) == 1
    finally:
        fixtures_consul.kv_delete_tree(prefix)


async def _finished_with_callback(store: Any, url: str) -> Execution:
    """A completed execution whose request names ``url``, stored in ``store``."""
    request = parse_request({"entrypoint": "main.py", "callback_url": url}, callback_settings())
    record = Execution(execution_id=new_execution_id(), request=request)
    await store.create(record, None)
    done = record.finished(RunOutcome(reason=Reason.EXITED, exit_code=0, stdout="out"))
    return await store.transition(record.execution_id, lambda _: done, expect={Status.PENDING})


def _later(seconds: float) -> Callable[[], datetime]:
    return lambda: utcnow() + timedelta(seconds=seconds)


@pytest.fixture
async def two_replicas() -> AsyncIterator[tuple[ConsulStore, ConsulStore]]:
    """Two Consul stores on one fresh prefix: two replicas' views of one execution."""
    prefix = fixtures_consul.new_prefix()
    settings = fixtures_consul.consul_settings_for(prefix)
    first, second = ConsulStore.from_settings(settings), ConsulStore.from_settings(settings)
    try:
        yield first, second
    finally:
        await first.aclose()
        await second.aclose()
        fixtures_consul.kv_delete_tree(prefix)


async def _dies_after_first_attempt(store: ConsulStore, record: Execution) -> None:
    """The replica that finished ``record`` records its first attempt, then dies (its
    delivery is cancelled while it waits to retry: it never writes again)."""
    waiting = asyncio.Event()

    async def sleep(_: float) -> None:
        waiting.set()
        await asyncio.Event().wait()

    dying = CallbackSender(callback_settings(callback_max_seconds=600.0), store, sleep=sleep)
    dying.on_finished(record)
    await asyncio.wait_for(waiting.wait(), 30)
    await dying.aclose(grace=0)


@pytest.mark.consul
async def test_a_delivery_whose_replica_died_is_taken_over(
    receiver: Receiver, two_replicas: tuple[ConsulStore, ConsulStore]
) -> None:
    """A replica dies mid-retry: its lease holds others off, then another replica delivers."""
    first, second = two_replicas
    receiver.statuses = [500]
    record = await _finished_with_callback(first, receiver.url)
    await _dies_after_first_attempt(first, record)
    held = (await second.get(record.execution_id)).callback
    assert held is not None
    assert (held.status, held.attempts) == ("pending", 1)

    settings = callback_settings(callback_max_seconds=600.0)
    too_soon = CallbackSender(settings, second)
    assert await too_soon.take_over() == 0
    await too_soon.aclose()
    heir = CallbackSender(settings, second, clock=_later(LEASE_MARGIN + 60))
    assert await heir.take_over() == 1
    await heir.aclose(grace=30)

    bodies = [got.body for got in await receiver.wait_for(2)]
    assert bodies[0] == bodies[1]
    assert json.loads(bodies[1])["stdout"] == "out"
    state = (await first.get(record.execution_id)).callback
    assert state is not None
    assert (state.status, state.attempts, state.owner) == ("delivered", 2, None)


@pytest.mark.consul
async def test_a_finished_run_whose_replica_died_before_delivering_is_taken_over(
    receiver: Receiver, two_replicas: tuple[ConsulStore, ConsulStore]
) -> None:
    """No delivery started (its replica died as it finished): another replica sends it once
    the finishing replica's margin has passed, not before."""
    first, second = two_replicas
    record = await _finished_with_callback(first, receiver.url)
    settings = callback_settings()
    early = CallbackSender(settings, second)
    assert await early.take_over() == 0
    await early.aclose()
    heir = CallbackSender(settings, second, clock=_later(LEASE_MARGIN + 1))
    assert await heir.take_over() == 1
    await heir.aclose(grace=30)
    (got,) = await receiver.wait_for(1)
    assert json.loads(got.body)["execution_id"] == record.execution_id
    state = (await second.get(record.execution_id)).callback
    assert state is not None
    assert (state.status, state.attempts) == ("delivered", 1)


@pytest.mark.consul
async def test_a_delivery_taken_over_past_its_bound_gives_up(
    receiver: Receiver, two_replicas: tuple[ConsulStore, ConsulStore]
) -> None:
    """Taken over after its bound (set when the first replica started): failed, not re-sent."""
    first, second = two_replicas
    receiver.statuses = [500]
    record = await _finished_with_callback(first, receiver.url)
    await _dies_after_first_attempt(first, record)
    heir = CallbackSender(callback_settings(), second, clock=_later(3600))
    assert await heir.take_over() == 1
    await heir.aclose(grace=30)
    assert len(receiver.received) == 1
    state = (await second.get(record.execution_id)).callback
    assert state is not None
    assert (state.status, state.attempts) == ("failed", 1)
