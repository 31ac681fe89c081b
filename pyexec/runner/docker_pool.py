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

import collections
import hashlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

import attrs
import docker.errors

from pyexec.artifacts import new_nonce
from pyexec.errors import BackendError, BackendUnavailable, PyexecError
from pyexec.models import ExecutionRequest
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
from pyexec.runner.pool import REFILLS, PoolCore, PoolObserver, PoolShape, pooled_requests
from pyexec.sandbox import Preload
from pyexec.settings import Settings

__all__ = ["LABEL_POOL", "DockerPool", "Sandbox", "served_execution", "served_name", "shape_key"]

log = logging.getLogger("pyexec.runner.docker_pool")

#: On every container the pool made (``1``); such a container has no execution label.
LABEL_POOL = "pyexec.pool"
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


_Shape = PoolShape[str, dict[str, Any], Sandbox]


class DockerPool(PoolCore[str, dict[str, Any], Sandbox]):
    """Sandboxes kept ready per shape; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        owner: str,
        *,
        observer: PoolObserver | None = None,
        refills: int = REFILLS,
    ) -> None:
        super().__init__(settings, observer=observer, refills=refills)
        self._engine = engine
        self._owner = owner
        #: Discarded containers whose removal the engine refused (retried while pruning).
        self._refused: set[str] = set()
        #: The most recent containers ``take`` handed out, newest last.
        self.served: collections.deque[str] = collections.deque(maxlen=_SERVED_KEPT)

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings, owner: str) -> DockerPool:
        """A pool of ``pool_size`` default-shaped sandboxes per pooled image."""
        pool = cls(engine, settings, owner)
        for request in pooled_requests(settings):
            pool.keep(request, settings.pool_size)
        return pool

    # --- what the runner uses -------------------------------------------------------------

    @staticmethod
    def poolable(request: ExecutionRequest, settings: Settings) -> bool:
        """Whether ``request`` runs in one container with no setup (what a pool serves)."""
        phases = plan(request, settings)
        return len(phases) == 1 and not phases[0].setup

    def keep(self, request: ExecutionRequest, size: int, preload: Preload | None = None) -> str:
        """Keep ``size`` sandboxes ready for requests shaped like ``request`` (with
        ``preload``'s modules imported ahead: a prewarmed dependency set); its key."""
        if not self.poolable(request, self._settings):
            raise ValueError("only a request without a setup phase can be pooled")
        phase = plan(request, self._settings)[0]
        args = container_args(
            self._settings, request, "", phase, None, self._owner, preload=preload
        )
        args["labels"] = {
            LABEL_MANAGED: "1",
            LABEL_OWNER: self._owner,
            LABEL_PHASE: "run",
            LABEL_POOL: "1",
        }
        key = shape_key(args)
        label = " ".join(preload.modules) if preload is not None else ""
        self._keep(key, request.docker_image, args, size, label)
        return key

    async def take(
        self, args: Mapping[str, Any], execution_id: str, *alternatives: Mapping[str, Any]
    ) -> Sandbox | None:
        """A waiting sandbox created with ``args`` (labels aside), else with the first of
        ``alternatives`` that has one, now the caller's to remove, named for
        ``execution_id`` before the run begins (so a run recorded as running can be
        adopted after a crash); ``None`` when there is none (the caller takes the cold
        path). One hit or one miss is counted."""
        image = str(args["image"])
        shapes = [self._shapes.get(shape_key(a)) for a in (args, *alternatives)]
        kept = [shape for shape in shapes if shape is not None]
        if not kept or self._closed:
            self._miss(image, "unpooled")
            return None
        for shape in kept:
            sandbox = await self._take_from(shape, execution_id)
            if sandbox is not None:
                return sandbox
        self._miss(image, "empty")
        return None

    async def _take_from(self, shape: _Shape, execution_id: str) -> Sandbox | None:
        while shape.ready:
            sandbox = shape.ready.pop(0)  # the oldest first: none idles to expiry in a queue
            if self._fresh(sandbox) and sandbox.waiting():
                self._owned.discard(sandbox.container)
                self.served.append(sandbox.container)
                self._hit(sandbox)
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
        return None

    def sandboxes(self) -> list[Sandbox]:
        """The sandboxes ready now (as last checked), of every shape."""
        return self._all_ready()

    def ready_containers(self) -> set[str]:
        return {sandbox.container for sandbox in self.sandboxes()}

    async def wait_ready(self, key: str | None, count: int, timeout: float) -> None:
        """Until ``count`` sandboxes of shape ``key`` (``None``: of every kept shape) are
        ready; ``TimeoutError`` after ``timeout`` seconds."""
        await self._wait_ready(count, timeout, key)

    async def _after_close(self) -> None:
        for container in list(self._owned):
            await self._remove(container)

    # --- filling --------------------------------------------------------------------------

    async def _check(self) -> None:
        """Remove sandboxes that died or waited too long; retry removals Docker refused."""
        stale: list[Sandbox] = []
        for shape in self._shapes.values():  # no await in this loop: ``take`` pops meanwhile
            fresh = [s for s in shape.ready if self._fresh(s) and s.waiting()]
            stale += [s for s in shape.ready if s not in fresh]
            shape.ready = fresh
        await self._discard(stale)
        for container in list(self._refused):
            await self._remove(container)

    async def _make(self, shape: _Shape) -> Sandbox:
        """Create, attach and start one sandbox of ``shape``; a failed one is removed."""
        container: str | None = None
        try:
            async with self._refilling:
                await self._check_image(shape.image)
                nonce = new_nonce()
                args = {**shape.spec, "labels": {**shape.spec["labels"], LABEL_NONCE: nonce}}
                container = await self._engine.create(args, on_created=self._owned.add)
                conn = await self._engine.attach(container)
                try:
                    await self._engine.start(container)
                except BaseException:  # cancelled (shutdown) or failed: close what we got
                    conn.close()
                    raise
        except PyexecError:
            if container is not None:
                await self._remove(container)
            raise
        return Sandbox(container, conn, shape.image, shape.key, time.monotonic(), nonce)

    async def _refill_failed(self, exc: PyexecError) -> None:
        """On an outage the pool empties: its sandboxes went with the engine."""
        if isinstance(exc, BackendUnavailable):
            await self._discard(self._take_all_ready())

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

    async def _discard(self, items: list[Sandbox]) -> None:
        """Close every connection first (a cancellation may come at any removal; the
        containers stay owned until removed, and ``aclose`` removes what is left)."""
        for sandbox in items:
            sandbox.conn.close()
        for sandbox in items:
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
