"""The local runner's warm pool: single-use sandboxes started ahead of time.

A pooled sandbox is a run container made from exactly the arguments a cold run of
the same shape would be created with (``docker_spec.container_args``: one
implementation of the flags), attached and started, its bootstrap blocked reading
the spec frame on stdin. ``DockerRunner`` asks ``take`` for one whose arguments
equal its own but for the labels (an execution id is not known in advance); on a
match it feeds the spec, tar and stdin to it as to a container it had just
started, and removes it when the run is over, like any other. A sandbox is handed
out once, never back: nothing of one execution can reach the next.

Sandboxes are made in the background, a few at a time; the pool never pulls an
image (a cold run does, when allowed), it waits for it to be on the host. One that dies or outlives
``pool_max_idle_seconds`` while it waits is removed and replaced, never handed out
(``take`` checks the attach stream, which ends when the container does). When
Docker cannot be reached, the pool empties and retries with backoff until it can.
Pool containers carry ``pyexec.pool`` and the owner label, so a restarted service
sweeps what a crashed one left (``DockerRunner.startup``).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

import anyio
import attrs
import docker.errors

from pyexec.artifacts import new_nonce
from pyexec.errors import BackendError, BackendUnavailable, BadRequest, PyexecError
from pyexec.models import ExecutionRequest, parse_request
from pyexec.runner.docker_engine import Engine
from pyexec.runner.docker_spec import (
    LABEL_MANAGED,
    LABEL_NONCE,
    LABEL_OWNER,
    LABEL_PHASE,
    container_args,
    plan,
)
from pyexec.runner.docker_stream import AttachSocket
from pyexec.runner.pool import NullPoolObserver, PoolObserver
from pyexec.settings import Settings, SettingsError

__all__ = ["LABEL_POOL", "DockerPool", "Sandbox", "served_execution", "served_name", "shape_key"]

log = logging.getLogger("pyexec.runner.docker_pool")

#: On every container the pool made (``1``); such a container has no execution label.
LABEL_POOL = "pyexec.pool"
#: How often the pool looks for dead and expired sandboxes when nothing wakes it.
_CHECK_INTERVAL = 0.5
#: Sandboxes being made at once, over all shapes.
_REFILLS = 2
#: Backoff after a failed refill (seconds): doubled per failure up to the maximum.
_BACKOFF = 0.5
_BACKOFF_MAX = 10.0
#: Container ids handed out, kept for diagnostics (``served``).
_SERVED_KEPT = 256


def served_name(execution_id: str) -> str:
    """The name a pooled sandbox takes when it is handed ``execution_id``'s run (its
    labels cannot change): a restarted service finds the run by it, as by a cold run
    container's execution label."""
    return f"pyexec-{execution_id}"


def served_execution(item: Mapping[str, Any]) -> str | None:
    """The execution a pooled sandbox serves, from the engine's listing of it (``None``
    for a sandbox still waiting, or anything else)."""
    if (item.get("Labels") or {}).get(LABEL_POOL) != "1":
        return None
    for name in item.get("Names") or ():
        head, _, execution_id = str(name).lstrip("/").partition("-")
        if head == "pyexec" and execution_id:
            return execution_id
    return None


def shape_key(args: Mapping[str, Any]) -> str:
    """What two runs must share to be served by the same kind of sandbox: every
    creation argument but the labels (which name the execution)."""
    shape = {key: value for key, value in args.items() if key != "labels"}
    encoded = json.dumps(shape, sort_keys=True, default=repr).encode()
    return hashlib.sha256(encoded).hexdigest()


@attrs.define(eq=False)
class Sandbox:
    """A started container blocked in its bootstrap, and its attach connection."""

    container: str
    conn: AttachSocket
    image: str
    key: str
    #: ``time.monotonic()`` when it was started.
    born: float
    #: Its artifacts mark's nonce (its own, in its ``LABEL_NONCE`` label: labels cannot
    #: change once the container is made).
    nonce: str = ""

    @property
    def age(self) -> float:
        return time.monotonic() - self.born

    def waiting(self) -> bool:
        """Whether it still waits for its input: its output stream is open and silent
        (the stream ends when the container does; a bootstrap prints nothing first)."""
        try:
            self.conn.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, ssl.SSLWantReadError):
            return True
        except OSError:
            return False
        return False


@attrs.define(eq=False)
class _Shape:
    key: str
    image: str
    args: dict[str, Any]
    size: int
    ready: list[Sandbox] = attrs.Factory(list)
    making: int = 0
    failures: int = 0
    retry_at: float = 0.0


class DockerPool:
    """Sandboxes kept ready per shape; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        owner: str,
        *,
        observer: PoolObserver | None = None,
        refills: int = _REFILLS,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._owner = owner
        self.observer: PoolObserver = observer or NullPoolObserver()
        self._shapes: dict[str, _Shape] = {}
        self._slots = asyncio.Semaphore(refills)
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._maintainer: asyncio.Task[None] | None = None
        #: Every container the pool made and has neither handed out nor removed yet.
        self._owned: set[str] = set()
        #: Discarded containers whose removal the engine refused (retried while pruning).
        self._refused: set[str] = set()
        self._closed = False
        #: The most recent containers ``take`` handed out, newest last.
        self.served: collections.deque[str] = collections.deque(maxlen=_SERVED_KEPT)

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings, owner: str) -> DockerPool:
        """A pool of ``pool_size`` default-shaped sandboxes per pooled image."""
        pool = cls(engine, settings, owner)
        for image in settings.pooled_images:
            try:
                request = parse_request({"docker_image": image}, settings)
            except BadRequest as exc:  # an image no request may name
                raise SettingsError(
                    f"PYEXEC_POOL_IMAGES: {exc.message}", name="PYEXEC_POOL_IMAGES"
                ) from None
            pool.keep(request, settings.pool_size)
        return pool

    # --- what the runner uses -------------------------------------------------------------

    @staticmethod
    def poolable(request: ExecutionRequest, settings: Settings) -> bool:
        """Whether ``request`` runs in one container with no setup (what a pool serves)."""
        phases = plan(request, settings)
        return len(phases) == 1 and not phases[0].setup

    def keep(self, request: ExecutionRequest, size: int) -> str:
        """Keep ``size`` sandboxes ready for requests shaped like ``request``; its key."""
        if not self.poolable(request, self._settings):
            raise ValueError("only a request without a setup phase can be pooled")
        phase = plan(request, self._settings)[0]
        args = container_args(self._settings, request, "", phase, None, self._owner)
        args["labels"] = {
            LABEL_MANAGED: "1",
            LABEL_OWNER: self._owner,
            LABEL_PHASE: "run",
            LABEL_POOL: "1",
        }
        key = shape_key(args)
        shape = self._shapes.get(key)
        if shape is None:
            self._shapes[key] = _Shape(key, request.docker_image, args, size)
        else:
            shape.size = size
        self._wake.set()
        return key

    def start(self) -> None:
        """Begin filling in the background (idempotent)."""
        if self._maintainer is None and not self._closed:
            self._maintainer = asyncio.create_task(self._maintain())

    async def take(self, args: Mapping[str, Any], execution_id: str) -> Sandbox | None:
        """A waiting sandbox created with ``args`` (labels aside), now the caller's to
        remove, named for ``execution_id`` before the run begins (so a run recorded as
        running can be adopted after a crash); ``None`` when there is none (the caller
        takes the cold path)."""
        image = str(args["image"])
        shape = self._shapes.get(shape_key(args))
        if shape is None or self._closed:
            self.observer.miss(image, "unpooled")
            return None
        max_idle = self._settings.pool_max_idle_seconds
        while shape.ready:
            sandbox = shape.ready.pop(0)  # the oldest first: none idles to expiry in a queue
            if sandbox.age < max_idle and sandbox.waiting():
                self._owned.discard(sandbox.container)
                self.served.append(sandbox.container)
                self.observer.hit(image, sandbox.age)
                try:
                    await self._name(sandbox.container, served_name(execution_id))
                except BaseException:  # cancelled before the caller holds it: ours to remove
                    sandbox.conn.close()
                    self._owned.add(sandbox.container)
                    self._spawn(self._remove(sandbox.container))
                    raise
                return sandbox
            sandbox.conn.close()  # now: a task cancelled before it ran would leave it open
            self._spawn(self._remove(sandbox.container))
        self.observer.miss(image, "empty")
        return None

    def wake(self) -> None:
        """Check and refill now rather than at the next periodic check. The runner calls
        it when a run is over: a sandbox made while a run it replaces still runs would
        take the CPU that run needs."""
        self._wake.set()

    def ready(self) -> dict[str, int]:
        """Sandboxes ready now, per pooled image."""
        counts: dict[str, int] = {}
        for shape in self._shapes.values():
            if shape.size > 0:
                counts[shape.image] = counts.get(shape.image, 0) + len(shape.ready)
        return counts

    def sandboxes(self) -> list[Sandbox]:
        """The sandboxes ready now (as last checked), of every shape."""
        return [sandbox for shape in self._shapes.values() for sandbox in shape.ready]

    def ready_containers(self) -> set[str]:
        return {sandbox.container for sandbox in self.sandboxes()}

    async def wait_ready(self, key: str, count: int, timeout: float) -> None:
        """Until ``count`` sandboxes of shape ``key`` are ready; ``TimeoutError`` after
        ``timeout`` seconds."""
        shape = self._shapes[key]
        with anyio.fail_after(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(shape.ready) >= count)

    async def aclose(self) -> None:
        """Stop filling and remove every sandbox the pool still holds (idempotent)."""
        self._closed = True
        tasks = {*self._tasks, *([self._maintainer] if self._maintainer else [])}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for shape in self._shapes.values():
            for sandbox in shape.ready:
                sandbox.conn.close()
            shape.ready.clear()
        for container in list(self._owned):
            await self._remove(container)

    # --- filling --------------------------------------------------------------------------

    async def _maintain(self) -> None:
        while True:
            try:
                await self._prune()
            except Exception:  # the pool must outlive any one failure; logged, retried
                log.exception("pruning the warm pool failed")
            now = time.monotonic()
            for shape in self._shapes.values():
                if now < shape.retry_at:
                    continue
                for _ in range(shape.size - len(shape.ready) - shape.making):
                    shape.making += 1
                    self._spawn(self._fill(shape))
            with anyio.move_on_after(_CHECK_INTERVAL):
                await self._wake.wait()
            self._wake.clear()

    async def _prune(self) -> None:
        """Remove sandboxes that died or waited too long; retry removals Docker refused."""
        max_idle = self._settings.pool_max_idle_seconds
        stale: list[Sandbox] = []
        for shape in self._shapes.values():  # no await in this loop: ``take`` pops meanwhile
            fresh = [s for s in shape.ready if s.age < max_idle and s.waiting()]
            stale += [s for s in shape.ready if s not in fresh]
            shape.ready = fresh
        await self._discard(stale)
        for container in list(self._refused):
            await self._remove(container)

    async def _fill(self, shape: _Shape) -> None:
        """Make one sandbox of ``shape``; on failure back off (and on an outage, empty
        the pool: its sandboxes went with the engine)."""
        container: str | None = None
        try:
            async with self._slots:
                await self._check_image(shape.image)
                nonce = new_nonce()
                args = {**shape.args, "labels": {**shape.args["labels"], LABEL_NONCE: nonce}}
                container = await self._engine.create(args, on_created=self._owned.add)
                handles: list[Any] = []
                try:
                    conn = AttachSocket(
                        await self._engine.attach(container, on_attached=handles.append)
                    )
                    await self._engine.start(container)
                except BaseException:  # cancelled (shutdown) or failed: close what we got
                    for handle in handles:
                        AttachSocket(handle).close()
                    raise
            shape.ready.append(
                Sandbox(container, conn, shape.image, shape.key, time.monotonic(), nonce)
            )
            shape.failures = 0
        except PyexecError as exc:
            shape.failures += 1
            backoff = min(_BACKOFF * 2 ** (shape.failures - 1), _BACKOFF_MAX)
            shape.retry_at = time.monotonic() + backoff
            code = exc.code if isinstance(exc, BackendError) else "error"
            self.observer.refill_failed(shape.image, code)
            log.warning("could not make a pooled sandbox of %s: %s", shape.image, exc.message)
            if isinstance(exc, BackendUnavailable):
                await self._empty()
            if container is not None:
                await self._remove(container)
        finally:
            shape.making -= 1
            async with self._changed:
                self._changed.notify_all()
            self._wake.set()

    async def _check_image(self, image: str) -> None:
        """The pool never pulls (a cold run does, when allowed): an image is pooled once
        it is on the host."""
        try:
            await self._engine.call(lambda api: api.inspect_image(image))  # type: ignore[no-untyped-call]
        except docker.errors.NotFound:
            raise BackendError(
                f"the image {image!r} is not on this host; it is pooled once a run pulled it",
                code="image_unavailable",
                image=image,
            ) from None

    async def _name(self, container: str, name: str) -> None:
        try:
            await self._engine.call(lambda api: api.rename(container, name))
        except (PyexecError, docker.errors.NotFound) as exc:
            # The engine refused: the run goes on; only a restart's adoption needs the name.
            log.info("could not name pooled sandbox %s %s: %s", container, name, exc)

    async def _empty(self) -> None:
        stale: list[Sandbox] = []
        for shape in self._shapes.values():
            stale += shape.ready
            shape.ready = []
        await self._discard(stale)

    async def _discard(self, sandboxes: list[Sandbox]) -> None:
        """Close every connection first (a cancellation may come at any removal; the
        containers stay owned until removed, and ``aclose`` removes what is left)."""
        for sandbox in sandboxes:
            sandbox.conn.close()
        for sandbox in sandboxes:
            await self._remove(sandbox.container)

    async def _remove(self, container: str) -> None:
        """Remove a pool container; what Docker refuses stays owned, retried later."""
        try:
            await self._engine.remove_container(container)
        except PyexecError as exc:
            log.warning("could not remove pooled sandbox %s: %s", container, exc.message)
            self._refused.add(container)
            return
        self._owned.discard(container)
        self._refused.discard(container)

    def _spawn(self, work: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
