"""The rules every warm pool shares (``PoolCore``), on a backend that makes plain objects."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import attrs
import pytest

from pyexec.errors import BackendError, BackendUnavailable, PyexecError
from pyexec.runner.pool import PoolCore, PoolShape
from pyexec.settings import Settings

from .conftest import make_settings

pytestmark = pytest.mark.anyio


@attrs.define(eq=False)
class Box:
    image: str
    born: float = attrs.Factory(time.monotonic)

    @property
    def age(self) -> float:
        return time.monotonic() - self.born


@attrs.define
class Recorder:
    failures: list[tuple[str, str]] = attrs.Factory(list)

    def hit(self, image: str, age: float) -> None:
        pass

    def miss(self, image: str, reason: str) -> None:
        pass

    def refill_failed(self, image: str, code: str) -> None:
        self.failures.append((image, code))


class BoxPool(PoolCore[str, None, Box]):
    """Makes a ``Box`` per sandbox; ``failing`` errors are raised by the next makes."""

    def __init__(self, settings: Settings, *, refills: int = 2) -> None:
        self.recorder = Recorder()
        super().__init__(settings, observer=self.recorder, refills=refills)
        self.failing: list[PyexecError] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.making_now = 0
        self.most_at_once = 0
        self.discarded: list[Box] = []

    def keep(self, image: str, size: int) -> None:
        self._keep(image, image, None, size)

    async def _make(self, shape: PoolShape[str, None, Box]) -> Box:
        async with self._refilling:
            self.making_now += 1
            self.most_at_once = max(self.most_at_once, self.making_now)
            try:
                await self.gate.wait()
                if self.failing:
                    raise self.failing.pop(0)
                return Box(shape.image)
            finally:
                self.making_now -= 1

    async def _check(self) -> None:
        stale: list[Box] = []
        for shape in self._shapes.values():
            stale += [box for box in shape.ready if not self._fresh(box)]
            shape.ready = [box for box in shape.ready if self._fresh(box)]
        await self._discard(stale)

    async def _discard(self, items: list[Box]) -> None:
        self.discarded += items

    async def _refill_failed(self, exc: PyexecError) -> None:
        if isinstance(exc, BackendUnavailable):
            await self._discard(self._take_all_ready())

    async def wait_ready(self, count: int) -> None:
        await self._wait_ready(count, timeout=10)


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def pool() -> AsyncIterator[BoxPool]:
    pool = BoxPool(make_settings(pool_max_idle_seconds=300.0))
    try:
        yield pool
    finally:
        await pool.aclose()


async def test_fills_every_shape_to_its_size(pool: BoxPool) -> None:
    """Each kept shape is filled to its size and counted per image; a size 0 is not listed."""
    pool.keep("a", 2)
    pool.keep("b", 1)
    pool.keep("c", 0)
    pool.start()
    await pool.wait_ready(1)
    await until(lambda: pool.ready() == {"a": 2, "b": 1})


async def test_makes_at_most_refills_at_once(pool: BoxPool) -> None:
    """Four missing sandboxes are made two at a time (the refill bound), then all are ready."""
    pool.gate.clear()
    pool.keep("a", 4)
    pool.start()
    await until(lambda: pool.making_now == 2)
    for _ in range(20):  # the other two makes had every chance to start
        await asyncio.sleep(0)
    assert pool.making_now == 2
    pool.gate.set()
    await pool.wait_ready(4)
    assert pool.most_at_once == 2


async def test_failed_refill_backs_off_and_is_reported(pool: BoxPool) -> None:
    """A failed make is reported with its code and retried after a backoff, not at once."""
    pool.failing.append(BackendError("no", code="image_unavailable"))
    pool.keep("a", 1)
    pool.start()
    await until(lambda: bool(pool.recorder.failures))
    assert pool.recorder.failures == [("a", "image_unavailable")]
    shape = pool._shapes["a"]
    assert shape.failures == 1
    assert shape.retry_at > time.monotonic()
    await pool.wait_ready(1)
    assert shape.failures == 0


async def test_outage_empties_the_pool_then_it_refills(pool: BoxPool) -> None:
    """A backend outage seen by a refill withdraws every ready sandbox; the pool refills."""
    pool.keep("a", 2)
    pool.start()
    await pool.wait_ready(2)
    before = list(pool._shapes["a"].ready)
    pool.keep("a", 3)
    pool.failing.append(BackendUnavailable("down", code="runner_unavailable"))
    await until(lambda: set(pool.discarded) == set(before))
    await pool.wait_ready(3)
    assert not set(pool._shapes["a"].ready) & set(before)


async def test_expired_sandbox_is_replaced() -> None:
    """A sandbox older than the idle limit is discarded by the periodic look and replaced."""
    pool = BoxPool(make_settings(pool_max_idle_seconds=0.3))
    try:
        pool.keep("a", 1)
        pool.start()
        await pool.wait_ready(1)
        (first,) = pool._shapes["a"].ready
        await until(lambda: first in pool.discarded)
        await until(lambda: pool.ready() == {"a": 1} and pool._shapes["a"].ready[0] is not first)
    finally:
        await pool.aclose()


async def test_aclose_discards_every_ready_sandbox_once(pool: BoxPool) -> None:
    """Shutdown cancels the refills and discards each ready sandbox; a second close does nothing."""
    pool.keep("a", 2)
    pool.start()
    await pool.wait_ready(2)
    ready = list(pool._shapes["a"].ready)
    await pool.aclose()
    assert pool.discarded == ready
    assert pool.ready() == {"a": 0}
    await pool.aclose()
    pool.start()
    assert pool.discarded == ready
    assert pool._maintainer is not None
    assert pool._maintainer.done()
