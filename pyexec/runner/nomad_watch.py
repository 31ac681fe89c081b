"""One Nomad event stream that serves every execution in flight.

The watcher holds a single long-lived connection (``/v1/event/stream``) and hands
each event to a callback; the runner decides which events matter. When the stream
breaks it reconnects with capped exponential backoff (with jitter) from the last
index it saw, and once subscribed asks the runner to reconcile: events that fell
out of Nomad's buffer while it was away are replaced by a fresh read of each run.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from pyexec.errors import BackendError
from pyexec.runner.nomad_http import NomadAPI

__all__ = ["EventWatcher"]

log = logging.getLogger("pyexec.runner.nomad")

TOPICS = ["Allocation:*", "Evaluation:*", "Job:*"]
MIN_BACKOFF = 0.2
MAX_BACKOFF = 15.0


class EventWatcher:
    def __init__(
        self,
        api: NomadAPI,
        *,
        on_event: Callable[[dict[str, Any]], None],
        reconcile: Callable[[], Awaitable[None]],
        index_prefix: str,
        topics: list[str] | None = None,
    ) -> None:
        self._api = api
        self._on_event = on_event
        self._reconcile = reconcile
        self._index_prefix = index_prefix
        self._topics = topics or TOPICS
        self._task: asyncio.Task[None] | None = None
        self.index = 0
        #: Set while subscribed and reconciled; tests and /health read it.
        self.connected = asyncio.Event()
        self.reconnects = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pyexec-nomad-watcher")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        delay = MIN_BACKOFF
        while True:
            try:
                if not self.index:
                    # Start from now: what happened before is read by reconciling.
                    self.index = await self._api.current_index(self._index_prefix)
                async for batch in self._api.events(self._topics, self.index):
                    if not batch:
                        await self._reconcile()
                        self.connected.set()
                        delay = MIN_BACKOFF
                        continue
                    self.index = max(self.index, int(batch.get("Index") or 0))
                    for event in batch["Events"]:
                        self._on_event(event)
                log.info("nomad event stream closed by the server; reconnecting")
            except BackendError as exc:
                log.warning("nomad event stream: %s; retrying in %.1f s", exc.message, delay)
            except ValueError as exc:
                log.warning("nomad event stream sent something unreadable: %s", exc)
            except Exception:
                # This one task carries every run in flight: a bug while handling one
                # answer must cost a reconnect, not the watcher.
                log.exception("nomad event watcher failed; reconnecting")
            self.connected.clear()
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 - jitter
            delay = min(delay * 2, MAX_BACKOFF)
