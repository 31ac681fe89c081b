"""Prometheus metrics for one app instance, and the ``/metrics`` endpoint.

Each app owns a ``Metrics`` with its own ``CollectorRegistry`` (never the
process-global one), so two apps in one process -- as in the tests -- count
separately. The app factory attaches it in two ways:

- the service's hooks call ``execution_started`` when a record becomes
  ``running`` (queue wait, created -> started) and ``execution_finished`` when
  this replica writes a record's final status (``pyexec_executions_total
  {status,reason}`` and the duration). The store's check-and-set lets one writer
  win each transition, so with several replicas each execution counts once;
- the store and runner are wrapped once (``metrics.store(store)``,
  ``metrics.runner(runner)``) in ``MeteredStore``/``MeteredRunner``, classes that
  implement the seams method by method (mypy checks them against the protocols,
  so a renamed or added seam method cannot slip past): any ``BackendError`` out
  of either seam is counted in ``pyexec_backend_errors_total{backend,code}`` and
  re-raised unchanged, and a runner ``start`` that succeeds puts the execution in
  flight until ``wait`` returns its outcome or ``kill`` releases it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from datetime import datetime
from typing import BinaryIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .deps.cache import DepsCache
from .errors import BackendError
from .models import Execution, ExecutionRequest, RunOutcome, Status
from .runner import OnOutput, OnRunning, Runner
from .runner.pool import WarmPool
from .store import Change, LiveOutput, OutputChunk, Store

__all__ = ["MeteredRunner", "MeteredStore", "Metrics", "metrics_route"]

#: Run durations span sub-second scripts to hour-long jobs.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Queue wait: container start on one machine, placement on a busy cluster.
QUEUE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: Building a dependency environment: a tiny wheel to a stack of scientific packages.
BUILD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
#: How long a pooled sandbox waited before it served (up to the idle limit, minutes).
POOL_AGE_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The service's metrics, registered in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.executions = Counter(
            "pyexec_executions",
            "Executions that reached a final status, by status and reason.",
            ["status", "reason"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "pyexec_execution_duration_seconds",
            "Run time of finished executions (started -> finished).",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "pyexec_queue_wait_seconds",
            "Time from submission to the sandboxed process starting (created -> started).",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "pyexec_backend_errors",
            "Errors raised by a backend, by backend (store, runner) and error code.",
            ["backend", "code"],
            registry=self.registry,
        )
        self.callback_attempts = Counter(
            "pyexec_callback_attempts",
            "Completion callback POSTs, by outcome (ok: a 2xx answer; error: anything else).",
            ["outcome"],
            registry=self.registry,
        )
        self.callbacks = Counter(
            "pyexec_callbacks",
            "Completion callbacks that ended, by status (delivered, failed: given up).",
            ["status"],
            registry=self.registry,
        )
        self._in_flight: set[str] = set()
        self.in_flight = Gauge(
            "pyexec_executions_in_flight",
            "Executions this replica launched and has not yet seen finish.",
            registry=self.registry,
        )
        self.in_flight.set_function(lambda: len(self._in_flight))
        self.pool_hits = Counter(
            "pyexec_pool_hits",
            "Runs served by a warm pool's sandbox, by image.",
            ["image"],
            registry=self.registry,
        )
        self.pool_misses = Counter(
            "pyexec_pool_misses",
            "Runs that took the cold path, by image and reason (unpooled: no pool for that "
            "image or shape; empty: none was ready).",
            ["image", "reason"],
            registry=self.registry,
        )
        self.pool_age = Histogram(
            "pyexec_pool_sandbox_age_seconds",
            "How long a pooled sandbox had waited when it was handed a run.",
            buckets=POOL_AGE_BUCKETS,
            registry=self.registry,
        )
        self.pool_refill_failures = Counter(
            "pyexec_pool_refill_failures",
            "Pooled sandboxes that could not be made, by image and error code.",
            ["image", "code"],
            registry=self.registry,
        )
        self.deps_hits = Counter(
            "pyexec_deps_cache_hits",
            "Runs whose requirements came from a ready cached environment.",
            registry=self.registry,
        )
        self.deps_misses = Counter(
            "pyexec_deps_cache_misses",
            "Runs that waited for their environment to be built (theirs or another's).",
            registry=self.registry,
        )
        self.deps_build = Histogram(
            "pyexec_deps_cache_build_seconds",
            "Time the trusted builder took per environment, by outcome (ok, failed).",
            ["outcome"],
            buckets=BUILD_BUCKETS,
            registry=self.registry,
        )

    # --- the service's hooks -------------------------------------------------------------

    def execution_started(self, record: Execution) -> None:
        """``record`` just became running: observe how long it queued."""
        if record.started_at is not None:
            wait = (record.started_at - record.created_at).total_seconds()
            self.queue_wait.observe(max(0.0, wait))

    def execution_finished(self, record: Execution) -> None:
        """This replica wrote ``record``'s final status: count it, observe its run time."""
        reason = "" if record.reason is None else record.reason.value
        self.executions.labels(status=record.status.value, reason=reason).inc()
        if record.duration_ms is not None:
            self.duration.observe(record.duration_ms / 1000)

    # --- a warm pool's observer (``pyexec.runner.pool.PoolObserver``) ----------------------

    def hit(self, image: str, age: float) -> None:
        self.pool_hits.labels(image=image).inc()
        self.pool_age.observe(age)

    def miss(self, image: str, reason: str) -> None:
        self.pool_misses.labels(image=image, reason=reason).inc()

    def refill_failed(self, image: str, code: str) -> None:
        self.pool_refill_failures.labels(image=image, code=code).inc()

    def watch_pool(self, pool: WarmPool) -> None:
        """Count what ``pool`` reports, and show its ready sandboxes per image."""
        pool.observer = self
        self.registry.register(_PoolReady(pool))

    # --- the dependency cache's observer (``pyexec.deps.cache.DepsObserver``) ---------------

    def deps_hit(self) -> None:
        self.deps_hits.inc()

    def deps_miss(self) -> None:
        self.deps_misses.inc()

    def deps_built(self, seconds: float, ok: bool) -> None:
        self.deps_build.labels(outcome="ok" if ok else "failed").observe(seconds)

    def watch_deps(self, cache: DepsCache) -> None:
        """Count what ``cache`` reports, and show the bytes it holds."""
        cache.observer = self
        self.registry.register(_DepsBytes(cache))

    def callback_attempted(self, outcome: str) -> None:
        self.callback_attempts.labels(outcome=outcome).inc()

    def callback_ended(self, status: str) -> None:
        self.callbacks.labels(status=status).inc()

    # --- what the wrappers report ------------------------------------------------------

    def launched(self, execution_id: str) -> None:
        self._in_flight.add(execution_id)

    def released(self, execution_id: str) -> None:
        self._in_flight.discard(execution_id)

    def backend_error(self, backend: str, error: BackendError) -> None:
        self.backend_errors.labels(backend=backend, code=error.code).inc()

    # --- the seams ---------------------------------------------------------------------

    def store(self, store: Store) -> MeteredStore:
        """``store`` with its backend errors counted."""
        return MeteredStore(store, self)

    def runner(self, runner: Runner) -> MeteredRunner:
        """``runner`` with launches tracked in flight and its backend errors counted."""
        return MeteredRunner(runner, self)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @contextlib.contextmanager
    def counting(self, backend: str) -> Iterator[None]:
        """Count a ``BackendError`` raised inside under ``backend``, and let it through."""
        try:
            yield
        except BackendError as exc:
            self.backend_error(backend, exc)
            raise


class MeteredStore:
    """A ``Store`` that counts its backend's errors; otherwise the store itself."""

    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.inner = store
        self._count = functools.partial(metrics.counting, "store")

    async def create(self, record: Execution, tar: BinaryIO | None) -> None:
        with self._count():
            await self.inner.create(record, tar)

    async def get(self, execution_id: str) -> Execution:
        with self._count():
            return await self.inner.get(execution_id)

    async def transition(
        self, execution_id: str, change: Change, *, expect: Collection[Status]
    ) -> Execution:
        with self._count():
            return await self.inner.transition(execution_id, change, expect=expect)

    async def open_tar(self, execution_id: str) -> AsyncIterator[bytes]:
        with self._count():
            async for chunk in self.inner.open_tar(execution_id):
                yield chunk

    async def delete(self, execution_id: str) -> None:
        with self._count():
            await self.inner.delete(execution_id)

    async def list_expired(self, now: datetime, ttl: float) -> list[str]:
        with self._count():
            return await self.inner.list_expired(now, ttl)

    async def list_active(self) -> list[Execution]:
        with self._count():
            return await self.inner.list_active()

    async def list_callbacks_outstanding(self) -> list[Execution]:
        with self._count():
            return await self.inner.list_callbacks_outstanding()

    async def wait_terminal(self, execution_id: str, timeout: float) -> Execution:
        with self._count():
            return await self.inner.wait_terminal(execution_id, timeout)

    async def ping(self) -> None:
        with self._count():
            await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def append_output(self, execution_id: str, chunks: Sequence[OutputChunk]) -> None:
        with self._count():
            await self.inner.append_output(execution_id, chunks)

    async def read_output(self, execution_id: str, stream: str, offset: int, limit: int) -> bytes:
        with self._count():
            return await self.inner.read_output(execution_id, stream, offset, limit)

    async def watch_output(self, execution_id: str, version: int, timeout: float) -> LiveOutput:
        with self._count():
            return await self.inner.watch_output(execution_id, version, timeout)

    async def put_artifacts(self, execution_id: str, blob: BinaryIO) -> None:
        with self._count():
            await self.inner.put_artifacts(execution_id, blob)

    async def open_artifacts(
        self, execution_id: str, start: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        with self._count():
            async for chunk in self.inner.open_artifacts(execution_id, start, length):
                yield chunk


class MeteredRunner:
    """A ``Runner`` that counts its backend's errors and keeps the in-flight set: a launch
    counts once it succeeded; once ``wait`` or ``kill`` returns, by any outcome, the
    service is done with the run (or kills it next)."""

    def __init__(self, runner: Runner, metrics: Metrics) -> None:
        self.inner = runner
        self._metrics = metrics
        self._count = functools.partial(metrics.counting, "runner")

    @property
    def survives_restart(self) -> bool:
        return self.inner.survives_restart

    @property
    def launch_allowance(self) -> float:
        return self.inner.launch_allowance

    @property
    def reads_stored_tar(self) -> bool:
        return self.inner.reads_stored_tar

    def check(self, request: ExecutionRequest) -> None:
        self.inner.check(request)

    async def startup(self) -> None:
        with self._count():
            await self.inner.startup()

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        *,
        on_output: OnOutput | None = None,
    ) -> None:
        with self._count():
            await self.inner.start(execution, request, tar, on_running, on_output=on_output)
        self._metrics.launched(execution.execution_id)

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        try:
            with self._count():
                return await self.inner.wait(execution_id, timeout)
        finally:
            self._metrics.released(execution_id)

    async def logs(self, execution_id: str) -> tuple[str, str]:
        with self._count():
            return await self.inner.logs(execution_id)

    async def kill(self, execution_id: str) -> None:
        try:
            with self._count():
                await self.inner.kill(execution_id)
        finally:
            self._metrics.released(execution_id)

    async def resume(self, execution: Execution, *, on_output: OnOutput | None = None) -> bool:
        with self._count():
            resumed = await self.inner.resume(execution, on_output=on_output)
        if resumed:
            self._metrics.launched(execution.execution_id)
        return resumed

    async def ping(self) -> None:
        with self._count():
            await self.inner.ping()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _PoolReady(Collector):
    """``pyexec_pool_ready{image}``, read from the pool at each scrape."""

    def __init__(self, pool: WarmPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "pyexec_pool_ready", "Warm pool sandboxes ready now, by image.", labels=["image"]
        )
        for image, count in sorted(self._pool.ready().items()):
            family.add_metric([image], count)
        yield family


class _DepsBytes(Collector):
    """``pyexec_deps_cache_bytes``, the finished environments' size, read at each scrape."""

    def __init__(self, cache: DepsCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "pyexec_deps_cache_bytes", "Bytes of finished dependency environments on this host."
        )
        family.add_metric([], self._cache.used_bytes())
        yield family


def metrics_route(metrics: Metrics, path: str = "/metrics") -> Route:
    """A ``GET`` route serving ``metrics`` in the Prometheus text format."""

    async def endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Route(path, endpoint, methods=["GET"], name="metrics", include_in_schema=False)
