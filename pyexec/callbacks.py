"""Delivering completion callbacks: the final record, POSTed signed to ``callback_url``.

The replica that writes an execution's final status delivers its callback (the service's
``Hooks.on_finished`` fires there, once per execution: the store's check-and-set lets one
writer win). Delivery is retried with exponential backoff for at most
``PYEXEC_CALLBACK_MAX_SECONDS``; each attempt is signed afresh (``pyexec.webhooks``).
The record carries how it goes, as ``callback: {status, attempts, last_error}``, and
``/metrics`` counts attempts and outcomes.

One replica delivers at a time, under a lease stored with the state (``owner``,
``lease_until``) and renewed by each attempt it records. Every replica sweeps, every
``SWEEP_SECONDS``, for finished executions whose callback is outstanding with no live
lease (its deliverer died mid-retry, or before its first attempt) and takes them over by
check-and-set, so a callback is delivered at least once while any replica runs, within
the bound set when its delivery started.

Redirects are not followed (they could lead to a host the operator did not allow); any
answer but a 2xx counts as a failed attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

import attrs
import httpx

from .__about__ import __version__
from .errors import NotFound, PyexecError
from .models import TERMINAL, CallbackState, Execution, callback_outstanding, utcnow
from .settings import Settings
from .store import Store
from .webhooks import EXECUTION_HEADER, SIGNATURE_HEADER, sign

__all__ = ["CallbackSender"]

log = logging.getLogger("pyexec.callbacks")

#: Longest one attempt may take, seconds (less when the overall bound is nearer).
ATTEMPT_TIMEOUT = 10.0
FIRST_DELAY = 1.0
MAX_DELAY = 60.0
#: A claim outlives the next wait and attempt by this much before another replica may
#: take the delivery over (and a finished record with no delivery started is left this
#: long to the replica that finished it).
LEASE_MARGIN = 30.0
#: How often each replica looks for deliveries nobody holds.
SWEEP_SECONDS = 15.0

#: Observes each attempt (ok or not) and each delivery's end (``delivered``/``failed``).
Observer = Callable[[str], None]


class CallbackSender:
    """Sends the callbacks of executions this replica finishes; one task per delivery."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        on_attempt: Observer | None = None,
        on_end: Observer | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], datetime] = utcnow,
        lease_margin: float = LEASE_MARGIN,
    ) -> None:
        self._secret = settings.callback_secret or ""
        self._bound = settings.callback_max_seconds
        self._store = store
        self._http = httpx.AsyncClient(
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": f"pyexec/{__version__}"},
        )
        self._on_attempt = on_attempt or (lambda _: None)
        self._on_end = on_end or (lambda _: None)
        self._sleep = sleep
        self._clock = clock
        self._lease_margin = lease_margin
        #: This replica's claim token (a new one per process: a restart is another owner).
        self._owner = secrets.token_hex(8)
        self._tasks: set[asyncio.Task[CallbackState | None]] = set()
        self._delivering: set[str] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def on_finished(self, record: Execution) -> None:
        """The service hook: start delivering if the request named a callback."""
        if callback_outstanding(record):
            self._start(record)

    def start(self) -> None:
        """Begin sweeping for deliveries nobody holds (call once the loop runs)."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="pyexec-callbacks")

    async def take_over(self) -> int:
        """Once: start every outstanding delivery nobody holds; how many were started."""
        started = 0
        for record in await self._store.list_callbacks_outstanding():
            if record.execution_id not in self._delivering and self._claimable(record):
                self._start(record)
                started += 1
        return started

    def _start(self, record: Execution) -> None:
        self._delivering.add(record.execution_id)
        task = asyncio.create_task(
            self._deliver(record), name=f"pyexec-callback-{record.execution_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._delivering.discard(record.execution_id))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self.take_over()
            except PyexecError as exc:
                log.warning("callback sweep: %s", exc.message)

    async def _deliver(self, record: Execution) -> CallbackState | None:
        """Claim the delivery, then try until a 2xx answer or its bound; returns (and
        stores) the final state, or ``None`` if another replica holds the delivery."""
        url = None if record.request is None else record.request.callback_url
        state = None if url is None else await self._claim(record.execution_id)
        if url is None or state is None or state.retry_until is None:
            return None
        retry_until = state.retry_until
        # The final record as it ended, the same bytes from whichever replica sends it
        # (the delivery's own state is not part of what is delivered).
        final = attrs.evolve(record, callback=None)
        body = json.dumps(final.to_dict(), separators=(",", ":")).encode()
        # A delivery taken over goes on at the backoff its attempts so far reached.
        delay = min(MAX_DELAY, FIRST_DELAY * 2 ** min(state.attempts, 6))
        while True:
            left = (retry_until - self._clock()).total_seconds()
            if state.attempts and left <= 0:
                # Taken over past the bound: give up (at least one attempt was made).
                state = attrs.evolve(state, status="failed", owner=None, lease_until=None)
                await self._save(record.execution_id, state)
                self._ended(record.execution_id, state)
                return state
            error = await self._attempt(url, body, record.execution_id, max(left, 0.1))
            state = attrs.evolve(
                state,
                status="delivered" if error is None else "pending",
                attempts=state.attempts + 1,
                last_error=error,
            )
            self._on_attempt("ok" if error is None else "error")
            left = (retry_until - self._clock()).total_seconds()
            if error is not None and left <= delay:
                state = attrs.evolve(state, status="failed")
            if state.status == "pending":
                state = attrs.evolve(state, lease_until=self._lease(delay))
            else:
                state = attrs.evolve(state, owner=None, lease_until=None)
            await self._save(record.execution_id, state)
            if state.status != "pending":
                self._ended(record.execution_id, state)
                return state
            await self._sleep(delay)
            delay = min(MAX_DELAY, delay * 2)

    def _ended(self, execution_id: str, state: CallbackState) -> None:
        self._on_end(state.status)
        if state.status == "failed":
            log.warning(
                "callback for %s given up after %d attempts: %s",
                execution_id,
                state.attempts,
                state.last_error,
            )

    def _lease(self, wait: float) -> datetime:
        """Until when a claim holds that waits ``wait`` seconds before its next attempt."""
        return self._clock() + timedelta(seconds=wait + ATTEMPT_TIMEOUT + self._lease_margin)

    def _claimable(self, record: Execution) -> bool:
        """Whether nobody holds ``record``'s delivery: no live lease, and (before any
        delivery started) the replica that finished it had its margin to begin."""
        now = self._clock()
        state = record.callback
        if state is None:
            ended = record.finished_at or record.created_at
            return record.execution_id in self._delivering or (
                (now - ended).total_seconds() >= self._lease_margin
            )
        return state.lease_until is None or state.lease_until <= now

    async def _claim(self, execution_id: str) -> CallbackState | None:
        """Take the delivery by check-and-set: the state this replica now holds, or
        ``None`` if another replica's lease holds it (or it is over)."""
        now = self._clock()

        def claim(record: Execution) -> Execution:
            if not callback_outstanding(record) or not self._claimable(record):
                return record
            state = record.callback or CallbackState(
                retry_until=(record.finished_at or now) + timedelta(seconds=self._bound)
            )
            if state.retry_until is None:  # a state stored before bounds were kept
                state = attrs.evolve(state, retry_until=now + timedelta(seconds=self._bound))
            held = attrs.evolve(state, owner=self._owner, lease_until=self._lease(FIRST_DELAY))
            return attrs.evolve(record, callback=held)

        try:
            record = await self._store.transition(execution_id, claim, expect=TERMINAL)
        except NotFound:
            return None  # expired and swept
        except PyexecError as exc:
            log.warning("callback of %s not claimed: %s", execution_id, exc.message)
            return None
        state = record.callback
        if state is None or state.owner != self._owner or state.status != "pending":
            return None
        return state

    async def _attempt(
        self, url: str, body: bytes, execution_id: str, remaining: float
    ) -> str | None:
        """One POST; ``None`` if it was taken (2xx), else why not."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self._secret),
            EXECUTION_HEADER: execution_id,
        }
        timeout = max(0.1, min(ATTEMPT_TIMEOUT, remaining))
        try:
            response = await self._http.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    async def _save(self, execution_id: str, state: CallbackState) -> None:
        """Put ``state`` on the stored record, inside the store's check-and-set loop."""

        def with_state(record: Execution) -> Execution:
            return attrs.evolve(record, callback=state)

        try:
            await self._store.transition(execution_id, with_state, expect=TERMINAL)
        except NotFound:
            return  # expired and swept: the delivery goes on without a record to show it
        except PyexecError as exc:
            log.warning("callback state of %s not stored: %s", execution_id, exc.message)

    async def aclose(self, grace: float = ATTEMPT_TIMEOUT) -> None:
        """Give deliveries in progress ``grace`` seconds (the runs a shutdown just killed
        are reported too), then stop those still retrying and close the client."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()
