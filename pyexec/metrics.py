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
  ``metrics.runner(runner)``): any ``BackendError`` out of either seam is
  counted in ``pyexec_backend_errors_total{backend,code}`` and re-raised
  unchanged, and a runner ``start`` that succeeds puts the execution in flight
  until ``wait`` returns its outcome or ``kill`` releases it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .errors import BackendError
from .models import Execution

__all__ = ["Metrics", "metrics_route"]

T = TypeVar("T")

#: Run durations span sub-second scripts to hour-long jobs.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Queue wait: container start on one machine, placement on a busy cluster.
QUEUE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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
        self._in_flight: set[str] = set()
        self.in_flight = Gauge(
            "pyexec_executions_in_flight",
            "Executions this replica launched and has not yet seen finish.",
            registry=self.registry,
        )
        self.in_flight.set_function(lambda: len(self._in_flight))

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

    # --- what the wrappers report ------------------------------------------------------

    def launched(self, execution_id: str) -> None:
        self._in_flight.add(execution_id)

    def released(self, execution_id: str) -> None:
        self._in_flight.discard(execution_id)

    def backend_error(self, backend: str, error: BackendError) -> None:
        self.backend_errors.labels(backend=backend, code=error.code).inc()

    # --- the seams ---------------------------------------------------------------------

    def store(self, store: T) -> T:
        """``store`` with its backend errors counted."""
        return cast(T, _Metered(store, "store", self))

    def runner(self, runner: T) -> T:
        """``runner`` with launches tracked in flight and its backend errors counted."""
        return cast(T, _Metered(runner, "runner", self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Metered:
    """A transparent proxy: every coroutine method of the target, observed."""

    def __init__(self, target: Any, backend: str, metrics: Metrics) -> None:
        self._target = target
        self._backend = backend
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        return self._wrap(name, attr)

    def _wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        metrics, backend = self._metrics, self._backend

        @functools.wraps(method)
        async def observed(*args: Any, **kwargs: Any) -> Any:
            ok, result = False, None
            try:
                result = await method(*args, **kwargs)
                ok = True
            except BackendError as exc:
                metrics.backend_error(backend, exc)
                raise
            finally:
                if backend == "runner":
                    _track(metrics, name, args, kwargs, ok=ok, result=result)
            return result

        return observed


def _track(
    metrics: Metrics,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    ok: bool,
    result: Any,
) -> None:
    """Keep the in-flight set: a launch counts once it succeeded; once ``wait`` or
    ``kill`` returns, by any outcome, the service is done with the run or kills it next."""
    if name not in {"start", "resume", "wait", "kill"}:
        return
    first = args[0] if args else kwargs.get("execution") or kwargs.get("execution_id")
    execution_id = str(first.execution_id if isinstance(first, Execution) else first)
    if name in {"wait", "kill"}:
        metrics.released(execution_id)
    elif ok and (name == "start" or (name == "resume" and result is True)):
        metrics.launched(execution_id)


def metrics_route(metrics: Metrics, path: str = "/metrics") -> Route:
    """A ``GET`` route serving ``metrics`` in the Prometheus text format."""

    async def endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return Route(path, endpoint, methods=["GET"], name="metrics", include_in_schema=False)
