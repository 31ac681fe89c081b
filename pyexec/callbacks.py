"""Delivering completion callbacks: the final record, POSTed signed to ``callback_url``.

The replica that writes an execution's final status delivers its callback (the service's
``Hooks.on_finished`` fires there, once per execution: the store's check-and-set lets one
writer win). Delivery is retried with exponential backoff for at most
``PYEXEC_CALLBACK_MAX_SECONDS``; each attempt is signed afresh (``pyexec.webhooks``).
The record carries how it goes, as ``callback: {status, attempts, last_error}``, and
``/metrics`` counts attempts and outcomes.

Redirects are not followed (they could lead to a host the operator did not allow); any
answer but a 2xx counts as a failed attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import attrs
import httpx

from .__about__ import __version__
from .errors import NotFound, PyexecError
from .models import TERMINAL, CallbackState, Execution
from .settings import Settings
from .store import Store
from .webhooks import EXECUTION_HEADER, SIGNATURE_HEADER, sign

__all__ = ["CallbackSender"]

log = logging.getLogger("pyexec.callbacks")

#: Longest one attempt may take, seconds (less when the overall bound is nearer).
ATTEMPT_TIMEOUT = 10.0
FIRST_DELAY = 1.0
MAX_DELAY = 60.0

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
        self._tasks: set[asyncio.Task[CallbackState]] = set()

    def on_finished(self, record: Execution) -> None:
        """The service hook: start delivering if the request named a callback."""
        request = record.request
        if request is None or request.callback_url is None:
            return
        task = asyncio.create_task(
            self.deliver(record, request.callback_url),
            name=f"pyexec-callback-{record.execution_id}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, record: Execution, url: str) -> CallbackState:
        """Try until a 2xx answer or the bound; returns (and stores) the final state."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._bound
        body = json.dumps(record.to_dict(), separators=(",", ":")).encode()
        state = CallbackState()
        await self._save(record.execution_id, state)
        delay = FIRST_DELAY
        while True:
            error = await self._attempt(url, body, record.execution_id, deadline - loop.time())
            state = CallbackState(
                status="delivered" if error is None else "pending",
                attempts=state.attempts + 1,
                last_error=error,
            )
            self._on_attempt("ok" if error is None else "error")
            remaining = deadline - loop.time()
            if error is not None and remaining <= delay:
                state = attrs.evolve(state, status="failed")
            await self._save(record.execution_id, state)
            if state.status != "pending":
                self._on_end(state.status)
                if state.status == "failed":
                    log.warning(
                        "callback for %s given up after %d attempts: %s",
                        record.execution_id,
                        state.attempts,
                        error,
                    )
                return state
            await self._sleep(delay)
            delay = min(MAX_DELAY, delay * 2)

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
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._http.aclose()
