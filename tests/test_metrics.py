"""Prometheus metrics: counted at the store and runner seams, served at /metrics."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette

from pyexec.errors import BackendUnavailable
from pyexec.metrics import Metrics, metrics_route
from pyexec.models import Execution, Reason, RunOutcome, new_execution_id, utcnow
from pyexec.store.memory import MemoryStore

from .conftest import app_client, make_settings
from .fakes import FakeRunner
from .tarfiles import make_tar


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class FlakyRunner(FakeRunner):
    """A runner double: launches succeed, waits report an exit, pings fail."""

    async def start(self, execution: Execution, *args: Any, **kwargs: Any) -> None:
        return None

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        return RunOutcome(reason=Reason.EXITED, exit_code=0)

    async def ping(self) -> None:
        raise BackendUnavailable("docker is gone", code="runner_unavailable")


class BrokenRunner(FakeRunner):
    """A runner double whose every call fails as if Docker were gone."""

    async def start(self, execution: Execution, *args: Any, **kwargs: Any) -> None:
        raise BackendUnavailable("docker is gone", code="runner_unavailable")

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        raise BackendUnavailable("docker is gone", code="runner_unavailable")


#: ``start``'s other arguments, which these doubles ignore.
UNUSED: Any = (None, None, None)


def finished_record(reason: Reason) -> Execution:
    created = utcnow()
    started = created + timedelta(seconds=0.3)
    record = Execution(execution_id=new_execution_id(), created_at=created, started_at=started)
    outcome = RunOutcome(reason=reason, exit_code=0, finished_at=started + timedelta(seconds=2))
    return record.finished(outcome)


def test_finished_executions_count_by_status_and_reason() -> None:
    """Each final write counts once under its status and reason."""
    metrics = Metrics()
    metrics.execution_finished(finished_record(Reason.EXITED))
    metrics.execution_finished(finished_record(Reason.TIMEOUT))
    total = "pyexec_executions_total"
    assert sample(metrics, total, status="completed", reason="exited") == 1
    assert sample(metrics, total, status="failed", reason="timeout") == 1
    assert sample(metrics, total, status="killed", reason="killed") == 0


def test_duration_and_queue_wait_are_observed() -> None:
    """Duration (started->finished) and queue wait (created->started) land in their histograms."""
    metrics = Metrics()
    record = finished_record(Reason.EXITED)
    metrics.execution_started(record)
    metrics.execution_finished(record)
    assert sample(metrics, "pyexec_execution_duration_seconds_count") == 1
    assert sample(metrics, "pyexec_execution_duration_seconds_sum") == pytest.approx(2.0)
    assert sample(metrics, "pyexec_queue_wait_seconds_count") == 1
    assert sample(metrics, "pyexec_queue_wait_seconds_sum") == pytest.approx(0.3)
    assert sample(metrics, "pyexec_queue_wait_seconds_bucket", le="0.5") == 1
    assert sample(metrics, "pyexec_queue_wait_seconds_bucket", le="0.25") == 0


def test_in_flight_follows_launch_and_collection() -> None:
    """A launched run is in flight until its outcome is collected or it is killed."""
    metrics = Metrics()
    runner = metrics.runner(FlakyRunner())
    one, two = (Execution(execution_id=new_execution_id()) for _ in range(2))

    async def scenario() -> list[float]:
        seen = []
        await runner.start(one, *UNUSED)
        await runner.start(two, *UNUSED)
        seen.append(sample(metrics, "pyexec_executions_in_flight"))
        await runner.wait(one.execution_id, 10)
        seen.append(sample(metrics, "pyexec_executions_in_flight"))
        await runner.kill(two.execution_id)
        await runner.kill(two.execution_id)
        seen.append(sample(metrics, "pyexec_executions_in_flight"))
        return seen

    assert asyncio.run(scenario()) == [2, 1, 0]


def test_a_failed_wait_or_launch_leaves_nothing_in_flight() -> None:
    """A wait that raises still ends the run's time in flight; a failed launch never starts it."""
    metrics = Metrics()
    runner = metrics.runner(BrokenRunner())
    record = Execution(execution_id=new_execution_id())

    async def scenario() -> list[float]:
        seen = []
        with pytest.raises(BackendUnavailable):
            await runner.start(record, *UNUSED)
        seen.append(sample(metrics, "pyexec_executions_in_flight"))
        metrics.launched(record.execution_id)
        with pytest.raises(BackendUnavailable):
            await runner.wait(record.execution_id, 10)
        seen.append(sample(metrics, "pyexec_executions_in_flight"))
        return seen

    assert asyncio.run(scenario()) == [0, 0]
    labels = {"backend": "runner", "code": "runner_unavailable"}
    assert sample(metrics, "pyexec_backend_errors_total", **labels) == 2


def test_backend_errors_are_counted_and_reraised() -> None:
    """A BackendError out of a seam is counted by backend and code, then raised unchanged."""
    metrics = Metrics()
    runner = metrics.runner(FlakyRunner())
    with pytest.raises(BackendUnavailable) as caught:
        asyncio.run(runner.ping())
    assert caught.value.code == "runner_unavailable"
    labels = {"backend": "runner", "code": "runner_unavailable"}
    assert sample(metrics, "pyexec_backend_errors_total", **labels) == 1


def test_each_instance_has_its_own_registry() -> None:
    """Two Metrics never share a registry, and neither touches the global one."""
    first, second = Metrics(), Metrics()
    first.backend_error("store", BackendUnavailable("down", code="store_unavailable"))
    labels = {"backend": "store", "code": "store_unavailable"}
    assert sample(first, "pyexec_backend_errors_total", **labels) == 1
    assert sample(second, "pyexec_backend_errors_total", **labels) == 0
    assert REGISTRY.get_sample_value("pyexec_backend_errors_total", labels) is None


def test_metrics_route_serves_prometheus_text() -> None:
    """GET /metrics answers the text exposition format with every metric family."""
    metrics = Metrics()
    app = Starlette(routes=[metrics_route(metrics)])

    async def fetch() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/metrics")

    response = asyncio.run(fetch())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for family in (
        "pyexec_executions_total",
        "pyexec_execution_duration_seconds",
        "pyexec_queue_wait_seconds",
        "pyexec_executions_in_flight",
        "pyexec_backend_errors_total",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in response.text


async def metrics_text(api: httpx.AsyncClient) -> str:
    response = await api.get("/metrics")
    assert response.status_code == 200
    return response.text


def value(text: str, line_prefix: str) -> float:
    """The value of the one exposition line that starts with ``line_prefix``."""
    (line,) = [line for line in text.splitlines() if line.startswith(line_prefix)]
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.anyio
async def test_app_metrics_move_after_an_execution() -> None:
    """After a sync run through the real app, /metrics shows it counted, timed and not in flight."""
    tar = make_tar({"main.py": "print('hi')\n"})
    async with app_client(make_settings(), store=MemoryStore(), runner=FakeRunner()) as api:
        before = await metrics_text(api)
        response = await api.post(
            "/api/v1/exec/sync", files={"tar": ("code.tar", tar, "application/x-tar")}
        )
        assert response.status_code == 200
        after = await metrics_text(api)
    counted = 'pyexec_executions_total{reason="exited",status="completed"}'
    assert counted not in before
    assert value(after, counted) == 1
    assert value(after, "pyexec_execution_duration_seconds_count") == 1
    assert value(after, "pyexec_queue_wait_seconds_count") == 1
    assert value(after, "pyexec_executions_in_flight") == 0


@pytest.mark.anyio
async def test_app_counts_a_runner_failure_as_a_backend_error() -> None:
    """A runner that cannot launch shows up by backend and code, and as a failed execution."""
    runner = FakeRunner()
    runner.fail_start = BackendUnavailable("docker is gone", code="runner_unavailable")
    tar = make_tar({"main.py": "print('hi')\n"})
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as api:
        response = await api.post(
            "/api/v1/exec/sync", files={"tar": ("code.tar", tar, "application/x-tar")}
        )
        assert response.status_code == 503
        text = await metrics_text(api)
    errors = 'pyexec_backend_errors_total{backend="runner",code="runner_unavailable"}'
    assert value(text, errors) == 1
    assert value(text, 'pyexec_executions_total{reason="error",status="failed"}') == 1
