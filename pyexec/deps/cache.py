"""The dependency cache of one host: leases of finished environments, built once.

A request's requirements become an ``EnvKey`` (``key``: normalised requirements,
target Python and platform, installer). ``DepsCache.lease`` hands out the finished
environment of a key, building it first if needed, and holds it in use until the
lease is released. The rules of the cache directory (marker written last and checked
before use, one builder per key, least-recently-used eviction that skips what is in
use) are ``cachedir``'s, shared with the Nomad installer task. The builder is a seam,
one per backend: ``docker.DockerBuilder`` runs the trusted image locally; on Nomad
the runner job's ``install`` task builds on its node (``nomad``).

Two cold requests of one key in this process share one build (the second awaits the
first's, within the build timeout); across processes on one host the build lock does
the same. See docs/deps-cache.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from importlib import resources
from typing import Protocol, TypeVar

import anyio
from anyio import to_thread

from .cachedir import CacheDir
from .key import EnvKey

__all__ = [
    "BuildFailed",
    "Builder",
    "DepsCache",
    "DepsObserver",
    "Lease",
    "NullDepsObserver",
    "builder_source",
]

log = logging.getLogger("pyexec.deps")

T = TypeVar("T")

#: Pauses while another process holds a key's build lock (or an eviction its use lock).
LOCK_POLL_SECONDS = (0.05, 1.0)


class BuildFailed(Exception):
    """A dependency environment could not be built (the run fails as ``setup_failed``)."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.output = output


class Builder(Protocol):
    async def build(self, key: EnvKey, build: str) -> None:
        """Install ``key``'s requirements into ``<build>/site`` and write the marker last
        (``cachedir.write_marker``); raise ``BuildFailed`` if that cannot be done."""


class DepsObserver(Protocol):
    def deps_hit(self) -> None: ...

    def deps_miss(self) -> None: ...

    def deps_built(self, seconds: float, ok: bool) -> None: ...


class NullDepsObserver:
    def deps_hit(self) -> None:
        pass

    def deps_miss(self) -> None:
        pass

    def deps_built(self, seconds: float, ok: bool) -> None:
        pass


def builder_source() -> str:
    """What the builder runs with ``python3 -I -c``: ``build_env.py``, then the cache
    rules it writes the marker with, then ``main()`` (standard library only)."""
    here = resources.files(__package__ or "pyexec.deps")
    first = here.joinpath("build_env.py").read_text(encoding="utf-8")
    rules = here.joinpath("cachedir.py").read_text(encoding="utf-8")
    rules = rules.replace("from __future__ import annotations\n", "", 1)
    return "\n\n".join([first, rules, "main()\n"])


class Lease:
    """A finished environment held in use (eviction skips it) until ``release``."""

    def __init__(self, cache: CacheDir, digest: str, fd: int, status: str) -> None:
        self.digest = digest
        self.site = cache.site(digest)
        #: ``hit``: it was ready; ``miss``: this lease waited for its build.
        self.status = status
        self._fd: int | None = fd

    def release(self) -> None:
        """Let the environment go (idempotent)."""
        if self._fd is not None:
            CacheDir.unlock(self._fd)
            self._fd = None


async def _poll(try_once: Callable[[], int | None], deadline: float, what: str) -> int:
    """Call ``try_once`` (returns a descriptor or ``None``) until it succeeds, pausing
    with a growing delay; ``BuildFailed`` once ``deadline`` (``anyio.current_time``) passes."""
    delay, longest = LOCK_POLL_SECONDS
    while True:
        fd = await to_thread.run_sync(try_once)
        if fd is not None:
            return fd
        if anyio.current_time() >= deadline:
            raise BuildFailed(f"gave up waiting for {what}")
        await anyio.sleep(min(delay, max(deadline - anyio.current_time(), 0.0)))
        delay = min(delay * 1.5, longest)


class DepsCache:
    """The dependency cache of this host (a ``cachedir.CacheDir``) with its builder."""

    def __init__(
        self,
        root: str,
        builder: Builder,
        *,
        cap_bytes: int,
        build_timeout: float,
        observer: DepsObserver | None = None,
        grace: float = 0.0,
    ) -> None:
        """``grace``: eviction also spares environments used within that many seconds
        (whose runs may hold no lease: adopted after a restart, or on another node's
        task that takes its lock later)."""
        self.dir = CacheDir(root)
        self.builder = builder
        self.cap_bytes = cap_bytes
        self.build_timeout = build_timeout
        self.observer: DepsObserver = observer or NullDepsObserver()
        self.grace = grace
        self._builds: dict[str, asyncio.Future[None]] = {}
        self._waiting: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def startup(self) -> None:
        """Create the layout, remove builds killed with their process, empty the trash."""
        await to_thread.run_sync(self.dir.prepare)
        await to_thread.run_sync(self.dir.sweep)

    async def lease(self, key: EnvKey, *, counted: bool = True) -> Lease:
        """The finished environment of ``key``, built first if there is none; waits at
        most the build timeout. Raises ``BuildFailed``. ``counted``: a run's lease (the
        observer's hits and misses), not the prewarm's."""
        digest = key.digest
        deadline = anyio.current_time() + self.build_timeout
        status = "hit"
        while True:
            fd = await _poll(lambda: self.dir.try_use(digest), deadline, "an eviction")
            if await to_thread.run_sync(self.dir.ready, digest) is not None:
                break
            CacheDir.unlock(fd)
            status = "miss"
            await self._built(key, deadline)
        lease = Lease(self.dir, digest, fd, status)
        if counted and status == "hit":
            self.observer.deps_hit()
        elif counted:
            self.observer.deps_miss()
        if status == "miss":
            # Something was added: make room (this lease's environment is in use, kept).
            removed = await to_thread.run_sync(self.dir.evict, self.cap_bytes, self.grace)
            if removed:
                log.info("deps cache: evicted %s", ", ".join(removed))
        return lease

    async def _built(self, key: EnvKey, deadline: float) -> None:
        """Wait for the build of ``key`` this process runs, starting it if none does."""
        digest = key.digest
        build = self._builds.get(digest)
        if build is None:
            build = asyncio.ensure_future(self._build(key, deadline))
            self._builds[digest] = build
            build.add_done_callback(lambda _: self._builds.pop(digest, None))
        self._waiting[digest] = self._waiting.get(digest, 0) + 1
        try:
            # Shielded: a waiter that gives up does not stop the build the others wait for.
            with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                await asyncio.shield(build)
        except TimeoutError:
            raise BuildFailed(
                f"the environment was not built within {self.build_timeout:g} s"
            ) from None
        finally:
            self._waiting[digest] -= 1
            if not self._waiting[digest]:
                del self._waiting[digest]

    def waiting(self) -> dict[str, int]:
        """Requests of this process waiting for a build, by key."""
        return dict(self._waiting)

    async def _build(self, key: EnvKey, deadline: float) -> None:
        digest = key.digest
        fd = await _poll(lambda: self.dir.try_build_lock(digest), deadline, "another builder")
        try:
            if await to_thread.run_sync(self.dir.ready, digest) is not None:
                return  # another process built it while this one waited for the lock
            build = await to_thread.run_sync(self.dir.new_build, digest)
            began = time.monotonic()
            ok = False
            try:
                with anyio.fail_after(max(deadline - anyio.current_time(), 0.0)):
                    await self.builder.build(key, build)
                marker = await to_thread.run_sync(self.dir.publish, build, digest)
                if marker is None:
                    raise BuildFailed("the build left no environment matching its marker")
                ok = True
                log.info(
                    "deps cache: built %s (%s) in %.1f s, %d bytes",
                    digest,
                    " ".join(key.requirements),
                    time.monotonic() - began,
                    marker["bytes"],
                )
            except TimeoutError:
                raise BuildFailed(
                    f"building the environment took longer than {self.build_timeout:g} s"
                ) from None
            finally:
                self.observer.deps_built(time.monotonic() - began, ok)
                with anyio.CancelScope(shield=True):
                    await to_thread.run_sync(lambda: shutil.rmtree(build, ignore_errors=True))
        finally:
            CacheDir.unlock(fd)

    def prewarm(
        self,
        keys: AsyncIterable[tuple[T, EnvKey]],
        ready: Callable[[T, EnvKey], Awaitable[None]] | None = None,
    ) -> None:
        """Build ``keys`` (each with what it is built for, e.g. an image) in the background
        (start-up is not held up), awaiting ``ready`` with each one built; failures are
        logged."""

        async def warm() -> None:
            async for item, key in keys:
                try:
                    (await self.lease(key, counted=False)).release()
                except BuildFailed as exc:
                    log.warning("deps cache: prewarming %s failed: %s", key.requirements, exc)
                    continue
                if ready is not None:
                    try:
                        await ready(item, key)
                    except Exception:  # the rest is still prewarmed; logged
                        log.exception("deps cache: after prewarming %s", key.requirements)

        task = asyncio.create_task(warm(), name="pyexec-deps-prewarm")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def used_bytes(self) -> int:
        return self.dir.used_bytes()

    async def aclose(self) -> None:
        for task in [*self._background, *self._builds.values()]:
            task.cancel()
        for task in [*self._background, *self._builds.values()]:
            with contextlib.suppress(BaseException):
                await task
