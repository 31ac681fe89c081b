"""Docker fixtures and helpers for tests that drive ``DockerRunner`` against the real engine.

Import what you need explicitly (``from .fixtures_docker import docker_client, ...``).
Every execution through ``execute`` also checks that nothing labelled with its id is
left behind (containers and volumes), whatever its outcome.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import anyio
import docker
import docker.errors
import pytest

from pyexec.models import Execution, RunOutcome, new_execution_id, parse_request
from pyexec.runner.docker import DockerRunner
from pyexec.runner.docker_spec import LABEL_EXECUTION
from pyexec.settings import Settings

from .tarfiles import make_tar

__all__ = [
    "Gate",
    "GatedAPI",
    "Started",
    "docker_client",
    "execute",
    "gated_client",
    "leftovers",
    "runtime_registered",
    "start",
    "tar_chunks",
]


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.DockerClient()
    try:
        yield client
    finally:
        client.close()


def runtime_registered(client: docker.DockerClient, runtime: str) -> bool:
    """Whether dockerd lists ``runtime`` (``scripts/bootstrap.sh`` registers ``runsc``)."""
    return runtime in (client.info().get("Runtimes") or {})


async def tar_chunks(data: bytes, size: int = 256 * 1024) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


def leftovers(client: docker.DockerClient, execution_id: str) -> list[str]:
    """Containers and volumes still labelled with ``execution_id``."""
    selector = {"label": f"{LABEL_EXECUTION}={execution_id}"}
    names = [f"container {c.id}" for c in client.containers.list(all=True, filters=selector)]
    names += [f"volume {v.name}" for v in client.volumes.list(filters=selector)]
    return names


class Started:
    """A launched execution: its id and the times ``on_running`` was called with."""

    def __init__(self, runner: DockerRunner, execution_id: str) -> None:
        self.runner = runner
        self.execution_id = execution_id
        self.running: list[datetime] = []
        self.running_event = asyncio.Event()
        #: The pooled sandbox the run took, if it took one.
        self.sandbox: str | None = None

    async def on_running(self, started_at: datetime) -> None:
        self.running.append(started_at)
        self.running_event.set()

    async def wait(self, timeout: float = 120) -> RunOutcome:
        """The outcome, once the run's containers are gone too (the runner removes them in
        the background after the outcome is known), so a test can check what is left."""
        outcome = await self.runner.wait(self.execution_id, timeout)
        await self.runner.removed(self.execution_id)
        return outcome


async def start(
    runner: DockerRunner,
    settings: Settings,
    files: dict[str, str | bytes] | bytes,
    **metadata: Any,
) -> Started:
    """Launch ``files`` (or a ready-made tar) with the request ``metadata``. On a runner
    with a pool, a request the pool can serve runs on a pooled sandbox made for its shape
    (the launch asserts it did)."""
    request = parse_request(metadata, settings)
    execution = Execution(execution_id=new_execution_id())
    started = Started(runner, execution.execution_id)
    data = files if isinstance(files, bytes) else make_tar(files)
    pool = runner.pool
    if pool is None or not pool.poolable(request, settings):
        await runner.start(execution, request, tar_chunks(data), started.on_running)
        return started
    key = pool.keep(request, 1)
    await pool.wait_ready(key, 1, timeout=60)
    served = len(pool.served)
    await runner.start(execution, request, tar_chunks(data), started.on_running)
    pool.keep(request, 0)
    assert len(pool.served) == served + 1, "the run did not take a pooled sandbox"
    started.sandbox = pool.served[-1]
    return started


async def execute(
    runner: DockerRunner,
    client: docker.DockerClient,
    settings: Settings,
    files: dict[str, str | bytes] | bytes,
    **metadata: Any,
) -> RunOutcome:
    """Run to the end and check that the execution left nothing behind."""
    started = await start(runner, settings, files, **metadata)
    outcome = await started.wait()
    assert leftovers(client, started.execution_id) == []
    if started.sandbox is not None:
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(started.sandbox)
    return outcome


class Gate:
    """A point a Docker call stops at until the test lets it go on."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def pass_through(self) -> None:
        self.reached.set()
        if not self.release.wait(60):
            raise TimeoutError("the test never opened the gate")

    async def wait_reached(self) -> None:
        assert await anyio.to_thread.run_sync(self.reached.wait, 60), "gate never reached"


class GatedAPI(docker.APIClient):
    """The real engine's API, with gates after a create and before a start or a removal, and a
    number of removals made to fail (the engine refusing), for races and error paths."""

    def __init__(self) -> None:
        super().__init__()
        self.after_create: Gate | None = None
        self.after_create_volume: Gate | None = None
        self.before_start: Gate | None = None
        self.before_remove: Gate | None = None
        self.failing_removals = 0

    def create_container(self, *args: Any, **kwargs: Any) -> Any:
        created = super().create_container(*args, **kwargs)
        if self.after_create is not None:
            self.after_create.pass_through()
        return created

    def create_volume(self, *args: Any, **kwargs: Any) -> Any:
        created = super().create_volume(*args, **kwargs)
        if self.after_create_volume is not None:
            self.after_create_volume.pass_through()
        return created

    def start(self, *args: Any, **kwargs: Any) -> Any:
        if self.before_start is not None:
            self.before_start.pass_through()
        return super().start(*args, **kwargs)

    def remove_container(self, *args: Any, **kwargs: Any) -> Any:
        if self.before_remove is not None:
            self.before_remove.pass_through()
        if self.failing_removals > 0:
            self.failing_removals -= 1
            raise docker.errors.APIError("simulated: the engine refused the removal")
        return super().remove_container(*args, **kwargs)


@pytest.fixture
def gated_client() -> Iterator[tuple[docker.DockerClient, GatedAPI]]:
    """A Docker client whose API the test can hold at a gate (see ``GatedAPI``)."""
    client = docker.DockerClient()
    client.api.close()
    api = GatedAPI()
    client.api = api
    try:
        yield client, api
    finally:
        client.close()
