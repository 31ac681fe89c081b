"""What every warm pool does, whatever the backend (``docker_pool``, ``nomad_pool``).

A pool keeps, per *shape* (what two requests must share to be served by the same kind
of sandbox), a list of single-use sandboxes made ahead of time. ``PoolCore`` holds the
rules that do not depend on the backend: the ready lists, the refill loop (a few
sandboxes made at once, backoff after a failure), the periodic look that replaces
sandboxes older than ``pool_max_idle_seconds``, ``wake``, ``ready``, waiting until a
pool is filled, shutdown (cancel the background work, withdraw every ready sandbox)
and what the observer is told. A backend subclass makes one sandbox (``_make``), says
whether one still waits and withdraws one (``_check``, ``_discard``), and hands one to
an execution (``take``, its own: a Docker rename, a Consul claim).

A pool tells its observer about each request it served (``hit``, with the age of the
sandbox handed out), each it could not (``miss``: ``unpooled`` for a request no pool
is kept for, ``empty`` when none was ready) and each sandbox it failed to make.
``WarmPool`` is what the app reads for ``/metrics`` and ``/health``.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import anyio
import attrs

from pyexec.errors import BackendError, PyexecError
from pyexec.models import ExecutionRequest, parse_request
from pyexec.settings import Settings, SettingsError

__all__ = [
    "NullPoolObserver",
    "PoolCore",
    "PoolObserver",
    "PoolShape",
    "Pooled",
    "WarmPool",
    "pooled_requests",
]

#: How often a pool looks at its sandboxes when nothing wakes it.
CHECK_INTERVAL = 0.5
#: Sandboxes being made at once, over all shapes.
REFILLS = 2
#: Backoff after a failed refill (seconds): doubled per failure up to the maximum.
BACKOFF = 0.5
BACKOFF_MAX = 10.0


class PoolObserver(Protocol):
    def hit(self, image: str, age: float) -> None: ...

    def miss(self, image: str, reason: str) -> None: ...

    def refill_failed(self, image: str, code: str) -> None: ...


class NullPoolObserver:
    """Observes nothing (a pool nobody meters)."""

    def hit(self, image: str, age: float) -> None:
        pass

    def miss(self, image: str, reason: str) -> None:
        pass

    def refill_failed(self, image: str, code: str) -> None:
        pass


@runtime_checkable
class WarmPool(Protocol):
    observer: PoolObserver

    def ready(self) -> dict[str, int]:
        """Sandboxes ready now, per pooled image (an image whose pool is empty: 0)."""
        ...

    def ready_preloaded(self) -> dict[str, int]:
        """Of those, the ones that imported a prewarmed set ahead, per ``<image>
        <modules>`` (``PYEXEC_DEPS_POOL_SIZE``; counted in ``ready`` too)."""
        ...


class Pooled(Protocol):
    """A sandbox a pool holds: of one image, made ``age`` seconds ago."""

    @property
    def image(self) -> str: ...

    @property
    def age(self) -> float: ...


K = TypeVar("K")
S = TypeVar("S")
T = TypeVar("T", bound=Pooled)


@attrs.define(eq=False)
class PoolShape(Generic[K, S, T]):
    """The sandboxes kept for one shape: ``spec`` is what the backend makes them from."""

    key: K
    image: str
    spec: S
    size: int
    #: What its sandboxes have besides their image (``ready_preloaded``), if anything.
    label: str = ""
    ready: list[T] = attrs.Factory(list)
    making: int = 0
    failures: int = 0
    retry_at: float = 0.0


def pooled_requests(settings: Settings) -> list[ExecutionRequest]:
    """A default request for each pooled image (what a pool is kept for at start-up)."""
    requests = []
    for image in settings.pooled_images:
        try:
            requests.append(parse_request({"docker_image": image}, settings))
        except PyexecError as exc:  # an image no request may name
            raise SettingsError(
                f"PYEXEC_POOL_IMAGES: {exc.message}", name="PYEXEC_POOL_IMAGES"
            ) from None
    return requests


class PoolCore(abc.ABC, Generic[K, S, T]):
    """Sandboxes kept ready per shape, refilled in the background; see the module
    docstring. ``noun`` names a sandbox in log lines, ``task_name`` the background task."""

    noun = "pooled sandbox"
    task_name: str | None = None

    def __init__(self, settings: Settings, *, observer: PoolObserver | None, refills: int) -> None:
        self._settings = settings
        self._log = logging.getLogger(type(self).__module__)
        self.observer: PoolObserver = observer or NullPoolObserver()
        self._shapes: dict[K, PoolShape[K, S, T]] = {}
        self._refilling = asyncio.Semaphore(refills)
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._maintainer: asyncio.Task[None] | None = None
        #: Every sandbox (by its backend id) made and neither handed out nor removed yet.
        self._owned: set[str] = set()
        self._closed = False
        #: While set, nothing is made (the backend cannot be reached).
        self._outage = False

    # --- backend hooks ---------------------------------------------------------------------

    @abc.abstractmethod
    async def _make(self, shape: PoolShape[K, S, T]) -> T | None:
        """Make one sandbox of ``shape`` (under ``self._refilling``) and return it ready;
        ``None`` when the pool closed meanwhile (the backend withdrew it). On a
        ``PyexecError`` the backend has released what it made."""

    @abc.abstractmethod
    async def _check(self) -> None:
        """One periodic look: drop from the ready lists what died or is not ``_fresh``."""

    @abc.abstractmethod
    async def _discard(self, items: list[T]) -> None:
        """Withdraw and remove ready sandboxes nobody will be handed."""

    async def _refill_failed(self, exc: PyexecError) -> None:
        """What a failed refill means beyond its backoff (e.g. an outage): nothing here."""

    def _check_failed(self, exc: PyexecError) -> bool:
        """Whether the backend handled a failed periodic look (else it is logged)."""
        return False

    async def _after_close(self) -> None:
        """Shutdown's last step, once the ready sandboxes are discarded."""

    # --- the shared rules ------------------------------------------------------------------

    def _keep(self, key: K, image: str, spec: S, size: int, label: str = "") -> None:
        """Keep ``size`` sandboxes ready for ``key`` (made from ``spec`` when new)."""
        shape = self._shapes.get(key)
        if shape is None:
            self._shapes[key] = PoolShape(key, image, spec, size, label)
        else:
            shape.size = size
        self._wake.set()

    def start(self) -> None:
        """Begin filling in the background (idempotent)."""
        if self._maintainer is None and not self._closed:
            self._maintainer = asyncio.create_task(self._maintain(), name=self.task_name)

    def wake(self) -> None:
        """Check and refill now rather than at the next periodic check. A runner calls
        it when a run is over: a sandbox made while a run it replaces still runs would
        take the CPU that run needs."""
        self._wake.set()

    def ready(self) -> dict[str, int]:
        """Sandboxes of this process ready now, per pooled image."""
        counts: dict[str, int] = {}
        for shape in self._shapes.values():
            if shape.size > 0:
                counts[shape.image] = counts.get(shape.image, 0) + len(shape.ready)
        return counts

    def ready_preloaded(self) -> dict[str, int]:
        """Of those, per labelled shape (``<image> <label>``)."""
        return {
            f"{shape.image} {shape.label}": len(shape.ready)
            for shape in self._shapes.values()
            if shape.size > 0 and shape.label
        }

    def _all_ready(self) -> list[T]:
        """The sandboxes ready now (as last checked), of every shape."""
        return [item for shape in self._shapes.values() for item in shape.ready]

    def _take_all_ready(self) -> list[T]:
        """Empty every ready list; what was in them."""
        items: list[T] = []
        for shape in self._shapes.values():
            items += shape.ready
            shape.ready = []
        return items

    def _fresh(self, item: T) -> bool:
        """Whether ``item`` is young enough to hand out (else it is replaced)."""
        return item.age < self._settings.pool_max_idle_seconds

    def _hit(self, item: T) -> T:
        self.observer.hit(item.image, item.age)
        return item

    def _miss(self, image: str, reason: str) -> None:
        self.observer.miss(image, reason)

    async def _wait_ready(self, count: int, timeout: float, key: K | None = None) -> None:
        """Until shape ``key`` (else every kept shape) has ``count`` sandboxes ready;
        ``TimeoutError`` after ``timeout`` seconds."""
        only = None if key is None else self._shapes[key]

        def done() -> bool:
            shapes = [only] if only is not None else [s for s in self._shapes.values() if s.size]
            return all(len(shape.ready) >= count for shape in shapes)

        with anyio.fail_after(timeout):
            async with self._changed:
                await self._changed.wait_for(done)

    async def aclose(self) -> None:
        """Stop filling and remove every sandbox the pool still holds (idempotent)."""
        self._closed = True
        tasks = {*self._tasks, *([self._maintainer] if self._maintainer else [])}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._discard(self._take_all_ready())
        await self._after_close()

    async def _maintain(self) -> None:
        log = self._log
        while True:
            try:
                await self._check()
            except PyexecError as exc:
                if not self._check_failed(exc):
                    log.exception("checking the warm pool failed")
            except Exception:  # the pool must outlive any one failure; logged, retried
                log.exception("checking the warm pool failed")
            now = time.monotonic()
            for shape in self._shapes.values():
                if now < shape.retry_at or self._outage:
                    continue
                for _ in range(shape.size - len(shape.ready) - shape.making):
                    shape.making += 1
                    self._spawn(self._fill(shape))
            with anyio.move_on_after(CHECK_INTERVAL):
                await self._wake.wait()
            self._wake.clear()

    async def _fill(self, shape: PoolShape[K, S, T]) -> None:
        """Make one sandbox of ``shape``; on failure back off and tell the observer."""
        try:
            item = await self._make(shape)
            if item is not None:
                shape.ready.append(item)
                shape.failures = 0
        except PyexecError as exc:
            shape.failures += 1
            backoff = min(BACKOFF * 2 ** (shape.failures - 1), BACKOFF_MAX)
            shape.retry_at = time.monotonic() + backoff
            code = exc.code if isinstance(exc, BackendError) else "error"
            self.observer.refill_failed(shape.image, code)
            self._log.warning("could not make a %s of %s: %s", self.noun, shape.image, exc.message)
            await self._refill_failed(exc)
        finally:
            shape.making -= 1
            async with self._changed:
                self._changed.notify_all()
            self._wake.set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
