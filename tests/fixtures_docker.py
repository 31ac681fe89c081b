"""Docker fixtures and helpers for tests that drive ``DockerRunner`` against the real engine.

Import what you need explicitly (``from .fixtures_docker import docker_client, ...``).
Every execution through ``execute`` also checks that nothing labelled with its id is
left behind (containers and volumes), whatever its outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import docker
import pytest

from pyexec.models import Execution, RunOutcome, new_execution_id, parse_request
from pyexec.runner.docker import DockerRunner
from pyexec.runner.docker_spec import LABEL_EXECUTION
from pyexec.settings import Settings

from .tarfiles import make_tar

__all__ = ["Started", "docker_client", "execute", "leftovers", "start", "tar_chunks"]


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    client = docker.DockerClient()
    try:
        yield client
    finally:
        client.close()


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

    async def on_running(self, started_at: datetime) -> None:
        self.running.append(started_at)
        self.running_event.set()

    async def wait(self, timeout: float = 120) -> RunOutcome:
        return await self.runner.wait(self.execution_id, timeout)


async def start(
    runner: DockerRunner,
    settings: Settings,
    files: dict[str, str | bytes] | bytes,
    **metadata: Any,
) -> Started:
    """Launch ``files`` (or a ready-made tar) with the request ``metadata``."""
    request = parse_request(metadata, settings)
    execution = Execution(execution_id=new_execution_id())
    started = Started(runner, execution.execution_id)
    data = files if isinstance(files, bytes) else make_tar(files)
    await runner.start(execution, request, tar_chunks(data), started.on_running)
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
    return outcome
