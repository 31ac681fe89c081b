"""The local runner's warm pool: single use, replacement, outages, shutdown, metrics.

Every verdict test of ``test_docker_runner.py`` also runs on a pooled sandbox (its
``PATHS`` parametrization); these tests pin what is the pool's own.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import docker
import docker.errors
import pytest

from pyexec.errors import BackendUnavailable
from pyexec.models import Execution, Reason, new_execution_id, parse_request
from pyexec.runner.docker import DockerRunner
from pyexec.runner.docker_engine import Engine
from pyexec.runner.docker_pool import LABEL_POOL, DockerPool
from pyexec.runner.docker_spec import LABEL_OWNER, container_args, plan
from pyexec.settings import Settings, SettingsError

from .conftest import app_client, make_settings
from .fixtures_docker import (
    Gate,
    GatedAPI,
    Started,
    docker_client,
    execute,
    gated_client,
    leftovers,
    start,
    tar_chunks,
)
from .tarfiles import make_tar

__all__ = ["docker_client", "gated_client"]  # fixtures, imported to be found by pytest

T = TypeVar("T")

pytestmark = [pytest.mark.docker, pytest.mark.anyio]

MARKER = """
import os, sys
open(sys.argv[1], "w").write("x")
print(sorted(name for name in os.listdir("/work") if not name.startswith(".")))
"""


class RecordingObserver:
    def __init__(self) -> None:
        self.hits: list[tuple[str, float]] = []
        self.misses: list[tuple[str, str]] = []
        self.failures: list[tuple[str, str]] = []

    def hit(self, image: str, age: float) -> None:
        self.hits.append((image, age))

    def miss(self, image: str, reason: str) -> None:
        self.misses.append((image, reason))

    def refill_failed(self, image: str, code: str) -> None:
        self.failures.append((image, code))


class OutageEngine(Engine):
    """The real engine, except that while ``down`` every call fails as when dockerd is
    not running (the seam a restarted engine is seen through)."""

    down = False

    async def call(self, fn: Callable[[docker.APIClient], T]) -> T:
        if self.down:
            raise BackendUnavailable(
                "Docker is not reachable: simulated outage", code="runner_unavailable"
            )
        return await super().call(fn)


def pool_settings(**overrides: Any) -> Settings:
    return make_settings(**{"pool_size": 2, "default_timeout": 20, **overrides})


def pool_containers(client: docker.DockerClient, owner: str) -> list[str]:
    selector = {"label": [f"{LABEL_POOL}=1", f"{LABEL_OWNER}={owner}"]}
    return [c.id for c in client.containers.list(all=True, filters=selector)]


async def until(predicate: Callable[[], bool], timeout: float = 60) -> None:
    """Until ``predicate()`` holds; fails after ``timeout`` seconds (a bounded poll of
    state the pool changes in the background)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition never held"
        await anyio.sleep(0.05)


@pytest.fixture
async def pooled(
    docker_client: docker.DockerClient,
) -> AsyncIterator[tuple[DockerRunner, RecordingObserver]]:
    """A runner whose pool keeps two default-shaped sandboxes, observed."""
    runner = DockerRunner(pool_settings(), docker_client)
    assert runner.pool is not None
    observer = RecordingObserver()
    runner.pool.observer = observer
    runner.pool.start()
    try:
        yield runner, observer
    finally:
        await runner.aclose()


def default_key(runner: DockerRunner, settings: Settings) -> str:
    assert runner.pool is not None
    return runner.pool.keep(parse_request({}, settings), settings.pool_size)


async def test_a_pooled_sandbox_serves_one_execution_only(
    pooled: tuple[DockerRunner, RecordingObserver], docker_client: docker.DockerClient
) -> None:
    """Two runs on pooled sandboxes each see only their own marker in /work; each took
    another sandbox, and both are gone afterwards."""
    runner, observer = pooled
    settings = runner._settings
    assert runner.pool is not None
    await runner.pool.wait_ready(default_key(runner, settings), 2, timeout=60)
    seen = []
    for marker in ("first", "second"):
        started = await start(runner, settings, {"main.py": MARKER}, script_args=[marker])
        outcome = await started.wait()
        assert outcome.reason is Reason.EXITED, outcome
        seen.append(outcome.stdout)
    assert seen == ["['first', 'main.py']\n", "['main.py', 'second']\n"]
    assert len(observer.hits) == 2
    first, second = list(runner.pool.served)[-2:]
    assert first != second
    for container in (first, second):
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(container)


async def test_a_run_the_pool_cannot_serve_takes_the_cold_path(
    pooled: tuple[DockerRunner, RecordingObserver], docker_client: docker.DockerClient
) -> None:
    """Another shape (more memory) or a setup phase runs cold, counted as a miss."""
    runner, observer = pooled
    settings = runner._settings
    for metadata in ({"config": {"memory_mb": 200}}, {"pre_commands": ["true"]}):
        request = parse_request(metadata, settings)
        execution = Execution(execution_id=new_execution_id())
        started = Started(runner, execution.execution_id)
        tar = tar_chunks(make_tar({"main.py": "print('cold')"}))
        await runner.start(execution, request, tar, started.on_running)
        outcome = await started.wait()
        assert (outcome.reason, outcome.stdout) == (Reason.EXITED, "cold\n")
        assert leftovers(docker_client, execution.execution_id) == []
    image = settings.default_image
    assert observer.misses == [(image, "unpooled")] * 2
    assert observer.hits == []


async def test_pooled_timings_are_the_executions_own(
    pooled: tuple[DockerRunner, RecordingObserver],
) -> None:
    """started_at is when the run began, not when its sandbox was made."""
    runner, _ = pooled
    settings = runner._settings
    assert runner.pool is not None
    await runner.pool.wait_ready(default_key(runner, settings), 2, timeout=60)
    await anyio.sleep(1)  # the sandboxes age; a run's start must not date from then
    before = time.time()
    started = await start(runner, settings, {"main.py": "print('hi')"})
    outcome = await started.wait()
    assert outcome.started_at is not None
    assert outcome.started_at.timestamp() >= before - 0.05


async def test_an_expired_sandbox_is_replaced(docker_client: docker.DockerClient) -> None:
    """A sandbox older than pool_max_idle_seconds is removed and a fresh one made."""
    settings = pool_settings(pool_size=1, pool_max_idle_seconds=1.5)
    runner = DockerRunner(settings, docker_client)
    assert runner.pool is not None
    pool = runner.pool
    pool.start()
    try:
        await pool.wait_ready(default_key(runner, settings), 1, timeout=60)
        (old,) = pool.ready_containers()
        await until(lambda: bool(pool.ready_containers() - {old}))
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(old)
    finally:
        await runner.aclose()


async def test_a_sandbox_that_died_is_replaced_and_never_handed_out(
    pooled: tuple[DockerRunner, RecordingObserver], docker_client: docker.DockerClient
) -> None:
    """Waiting sandboxes killed from outside are never handed out: the next run takes
    the cold path (or a fresh sandbox), and the pool makes new ones."""
    runner, _ = pooled
    settings = runner._settings
    assert runner.pool is not None
    pool = runner.pool
    await pool.wait_ready(default_key(runner, settings), 2, timeout=60)
    dead = pool.sandboxes()
    for sandbox in dead:
        docker_client.containers.get(sandbox.container).kill()
        docker_client.containers.get(sandbox.container).wait(timeout=30)
    await until(lambda: not any(sandbox.waiting() for sandbox in dead), timeout=30)
    execution = Execution(execution_id=new_execution_id())
    started = Started(runner, execution.execution_id)
    tar = tar_chunks(make_tar({"main.py": "print('alive')"}))
    await runner.start(execution, parse_request({}, settings), tar, started.on_running)
    outcome = await started.wait()
    assert (outcome.reason, outcome.stdout) == (Reason.EXITED, "alive\n")
    gone = {sandbox.container for sandbox in dead}
    assert not gone & set(pool.served)
    await until(lambda: len(pool.ready_containers() - gone) == 2)
    for container in gone:
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(container)


async def test_an_engine_outage_empties_the_pool_and_it_refills_after(
    docker_client: docker.DockerClient,
) -> None:
    """While the engine is down the pool is empty (its sandboxes died with the engine)
    and refills fail; once it is back, the pool refills by itself and serves runs."""
    settings = pool_settings()
    engine = OutageEngine(settings, docker_client)
    runner = DockerRunner(settings, docker_client, engine=engine)
    assert runner.pool is not None
    pool = runner.pool
    observer = RecordingObserver()
    pool.observer = observer
    pool.start()
    try:
        key = default_key(runner, settings)
        await pool.wait_ready(key, 2, timeout=60)
        engine.down = True
        # What a restart of the engine does to running containers.
        for container in pool.ready_containers():
            docker_client.containers.get(container).kill()
        await until(lambda: pool.ready() == {settings.default_image: 0} and bool(observer.failures))
        assert {code for _, code in observer.failures} == {"runner_unavailable"}
        engine.down = False
        await pool.wait_ready(key, 2, timeout=60)
        outcome = await execute(runner, docker_client, settings, {"main.py": "print('back')"})
        assert (outcome.reason, outcome.stdout) == (Reason.EXITED, "back\n")
        assert observer.hits
    finally:
        await runner.aclose()
    assert pool_containers(docker_client, runner._owner) == []


async def test_shutdown_removes_every_pooled_sandbox(docker_client: docker.DockerClient) -> None:
    """Closing the runner, also while sandboxes are being made, leaves no pool container."""
    settings = pool_settings(pool_size=3)
    runner = DockerRunner(settings, docker_client)
    assert runner.pool is not None
    runner.pool.start()
    await runner.pool.wait_ready(default_key(runner, settings), 1, timeout=60)
    await runner.aclose()
    assert pool_containers(docker_client, runner._owner) == []


async def test_startup_sweeps_the_pool_a_crashed_process_left(
    docker_client: docker.DockerClient,
) -> None:
    """Sandboxes of a process that is gone are removed when a runner starts up."""
    settings = pool_settings(pool_size=1)
    proc = await asyncio.create_subprocess_exec("true")  # a process that has exited
    await proc.wait()
    owner = f"{socket.gethostname()}:{proc.pid}:1"
    engine = Engine(settings, docker_client)
    crashed = DockerPool(engine, settings, owner)
    key = crashed.keep(parse_request({}, settings), 1)
    crashed.start()
    await crashed.wait_ready(key, 1, timeout=60)
    # The process "crashes": its pool stops without removing anything.
    assert crashed._maintainer is not None
    crashed._maintainer.cancel()
    for sandbox in crashed.sandboxes():  # its connections die with the process
        sandbox.conn.close()
    left = pool_containers(docker_client, owner)
    assert len(left) == 1
    runner = DockerRunner(settings, docker_client, pooled=False)
    try:
        await runner.startup()
    finally:
        await runner.aclose()
    assert pool_containers(docker_client, owner) == []


def test_a_pooled_image_no_request_may_name_is_a_setting_error() -> None:
    """PYEXEC_POOL_IMAGES naming an image outside PYEXEC_ALLOWED_IMAGES stops start-up."""
    settings = pool_settings(pool_images=("elsewhere:1",), allowed_images=("other:1",))
    with pytest.raises(SettingsError, match="PYEXEC_POOL_IMAGES"):
        DockerRunner(settings)


async def test_pool_args_are_the_cold_paths_own(settings: Settings) -> None:
    """A pooled sandbox is created with exactly a cold run's arguments but the labels."""
    settings = pool_settings()
    runner = DockerRunner(settings, pooled=True)
    assert runner.pool is not None
    request = parse_request({}, settings)
    key = runner.pool.keep(request, 1)
    cold = container_args(settings, request, "exe_x", plan(request, settings)[0], None, "o")
    pooled = runner.pool._shapes[key].spec
    assert {k: v for k, v in pooled.items() if k != "labels"} == {
        k: v for k, v in cold.items() if k != "labels"
    }
    assert "pyexec.execution_id" not in pooled["labels"]
    await runner.aclose()


async def test_metrics_and_health_show_the_pool(
    gated_client: tuple[docker.DockerClient, GatedAPI],
) -> None:
    """/metrics counts hits, misses, ages and ready sandboxes; /health says when a pool
    is empty (degraded: runs still work); shutdown leaves no pool container."""
    client, api_client = gated_client
    settings = pool_settings(pool_size=1)
    runner = DockerRunner(settings, client)
    assert runner.pool is not None
    pool = runner.pool
    key = default_key(runner, settings)
    image = settings.default_image
    tar = make_tar({"main.py": "print('hi')"})

    async def run(api: Any, config: dict[str, Any]) -> None:
        response = await api.post(
            "/api/v1/exec/sync",
            files={"tar": ("code.tar", tar, "application/x-tar")},
            data={"metadata": json.dumps({"config": config})},
        )
        assert response.json()["stdout"] == "hi\n"

    async with app_client(settings, runner=runner) as api:
        await pool.wait_ready(key, 1, timeout=60)
        health = (await api.get("/health")).json()
        assert health["pool"] == {"ready": {image: 1}, "empty": []}
        assert health["status"] == "ok"
        await run(api, {"memory_mb": 200})
        # The refill after the next run stops at the gate: the pool stays empty.
        gate = api_client.after_create = Gate()
        await run(api, {})
        await gate.wait_reached()
        health = (await api.get("/health")).json()
        assert (health["status"], health["pool"]["empty"]) == ("degraded", [image])
        gate.release.set()
        text = (await api.get("/metrics")).text
        assert f'pyexec_pool_hits_total{{image="{image}"}} 1.0' in text
        assert f'pyexec_pool_misses_total{{image="{image}",reason="unpooled"}} 1.0' in text
        assert "pyexec_pool_sandbox_age_seconds_count 1.0" in text
        assert f'pyexec_pool_ready{{image="{image}"}} 0.0' in text
    assert pool_containers(client, runner._owner) == []


class PullCountingAPI(docker.APIClient):
    """The real engine's API, counting pulls."""

    pulls = 0

    def pull(self, *args: Any, **kwargs: Any) -> Any:
        self.pulls += 1
        return super().pull(*args, **kwargs)


async def test_the_pool_never_pulls_an_image() -> None:
    """An image that is not on the host is not pooled (a refill failure), and not pulled,
    even with pulling on: only a cold run pulls. (The image names a loopback registry.)"""
    image = "127.0.0.1:9/pyexec-absent:never"
    settings = pool_settings(
        pool_size=1, pool_images=(image,), allowed_images=(image,), docker_pull=True
    )
    client = docker.DockerClient()
    client.api.close()
    api = client.api = PullCountingAPI()
    runner = DockerRunner(settings, client)
    assert runner.pool is not None
    observer = RecordingObserver()
    runner.pool.observer = observer
    runner.pool.start()
    try:
        await until(lambda: len(observer.failures) >= 2)
        assert set(observer.failures) == {(image, "image_unavailable")}
        assert api.pulls == 0
        assert runner.pool.ready() == {image: 0}
    finally:
        await runner.aclose()
        client.close()


async def test_ready_sandboxes_do_not_count_against_max_in_flight(
    docker_client: docker.DockerClient,
) -> None:
    """With two sandboxes ready and PYEXEC_MAX_IN_FLIGHT=1, a run is admitted (and takes
    one): only a sandbox that serves counts."""
    settings = pool_settings(max_in_flight=1)
    runner = DockerRunner(settings, docker_client)
    assert runner.pool is not None
    pool = runner.pool
    key = default_key(runner, settings)
    async with app_client(settings, runner=runner) as api:
        await pool.wait_ready(key, 2, timeout=60)
        response = await api.post(
            "/api/v1/exec/sync",
            files={"tar": ("code.tar", make_tar({"main.py": "print('in')"}), "application/x-tar")},
            data={"metadata": "{}"},
        )
        assert response.status_code == 200, response.text
        assert response.json()["stdout"] == "in\n"
        assert len(pool.served) == 1
    assert pool_containers(docker_client, runner._owner) == []
