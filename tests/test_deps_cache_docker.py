"""The dependency cache on the local Docker runner, against the real engine.

The trusted builder installs tiny wheels made here (``tests/wheels.py``) from a
find-links directory, with no package index: nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import docker
import pytest

from pyexec.deps import cachedir
from pyexec.deps.cache import BuildFailed
from pyexec.deps.cachedir import CacheDir
from pyexec.models import Reason, parse_request
from pyexec.runner.docker import DockerRunner
from pyexec.runner.docker_engine import owner_label
from pyexec.settings import Settings

from .conftest import CA_BUNDLE, TEST_IMAGE, app_client, make_settings
from .fixtures_docker import docker_client, execute
from .wheels import make_wheel

__all__ = ["docker_client"]

pytestmark = [pytest.mark.docker, pytest.mark.anyio]

SHOW = "import tinypkg\nprint(tinypkg.VERSION, tinypkg.__file__)\n"


def deps_settings(tmp_path: Path, **overrides: object) -> Settings:
    """A cache in ``tmp_path`` whose builder knows only the wheels in ``tmp_path/wheels``."""
    wheels = tmp_path / "wheels"
    if not wheels.exists():
        make_wheel(wheels, "tinypkg", "1.0")
        make_wheel(wheels, "tinypkg", "2.0")
    options: dict[str, object] = {
        "deps_cache_bytes": 10**9,
        "deps_cache_dir": str(tmp_path / "cache"),
        "deps_index_url": None,
        "deps_find_links": str(wheels),
        "setup_network": True,
        **overrides,
    }
    return make_settings(**options)


class Counted:
    """Counts the builds a runner's cache reports."""

    def __init__(self) -> None:
        self.built: list[bool] = []

    def deps_hit(self) -> None:
        pass

    def deps_miss(self) -> None:
        pass

    def deps_built(self, seconds: float, ok: bool) -> None:
        self.built.append(ok)


@pytest.fixture
async def runner(
    tmp_path: Path, docker_client: docker.DockerClient
) -> AsyncIterator[tuple[DockerRunner, Settings, Counted]]:
    settings = deps_settings(tmp_path)
    runner = DockerRunner(settings, docker_client)
    counted = Counted()
    assert runner.deps is not None
    runner.deps.cache.observer = counted
    await runner.startup()
    try:
        yield runner, settings, counted
    finally:
        await runner.aclose()


async def test_requirements_come_from_one_build_for_two_concurrent_runs(
    runner: tuple[DockerRunner, Settings, Counted], docker_client: docker.DockerClient
) -> None:
    """Two cold runs with the same requirements build one environment; both import it
    from the read-only mount; a later run finds it ready (``hit``)."""
    dockers, settings, counted = runner
    first, second = await asyncio.gather(
        *(
            execute(dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt=req)
            for req in ("tinypkg==1.0", "TinyPkg == 1.0  # the same set, spelled otherwise")
        )
    )
    for outcome in (first, second):
        assert outcome.reason is Reason.EXITED, (outcome.error, outcome.stderr)
        version, path = outcome.stdout.split()
        assert version == "1.0"
        assert path.startswith("/opt/pyexec/envs/")
        assert path.endswith("/site/tinypkg/__init__.py")
        assert outcome.deps_cache == "miss"
    assert counted.built == [True]
    third = await execute(
        dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt="tinypkg==1.0\n"
    )
    assert (third.stdout, third.deps_cache) == (first.stdout, "hit")
    assert counted.built == [True]


async def test_a_differently_pinned_requirement_is_another_environment(
    runner: tuple[DockerRunner, Settings, Counted], docker_client: docker.DockerClient
) -> None:
    """tinypkg==1.0 and tinypkg==2.0 are two environments, each with its own version."""
    dockers, settings, _ = runner
    versions = []
    for pin in ("1.0", "2.0", "1.0"):
        outcome = await execute(
            dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt=f"tinypkg=={pin}"
        )
        versions.append((outcome.stdout.split()[0], outcome.deps_cache))
    assert versions == [("1.0", "miss"), ("2.0", "miss"), ("1.0", "hit")]
    assert dockers.deps is not None
    assert len(dockers.deps.cache.dir.entries()) == 2


WRITER = """\
import errno, os, tinypkg
path = tinypkg.__file__
attempts = {
    "append": lambda: open(path, "a").write("pwned"),
    "create": lambda: open(os.path.join(os.path.dirname(path), "new.py"), "w"),
    "remove": lambda: os.remove(path),
    "mkdir": lambda: os.mkdir("/opt/pyexec/envs/more"),
}
for name, attempt in attempts.items():
    try:
        attempt()
        print(name, "succeeded")
    except OSError as exc:
        print(name, errno.errorcode[exc.errno])
"""


def _make_world_writable(root: str) -> None:
    for here, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            os.chmod(os.path.join(here, name), 0o777)  # noqa: S103 - the point of the test
    os.chmod(root, 0o777)  # noqa: S103 - the point of the test


async def test_a_run_cannot_modify_the_cache(
    runner: tuple[DockerRunner, Settings, Counted], docker_client: docker.DockerClient
) -> None:
    """Writes into the environment fail as a read-only file system, even where the files'
    permissions would let the run's user write; the next run sees the original."""
    dockers, settings, _ = runner
    first = await execute(
        dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt="tinypkg==1.0"
    )
    assert dockers.deps is not None
    [entry] = dockers.deps.cache.dir.entries()
    site = dockers.deps.cache.dir.site(entry.key)
    _make_world_writable(site)  # only the mount's read-only flag stands in the way now
    before = cachedir.tree_digest(site)
    attack = await execute(
        dockers, docker_client, settings, {"main.py": WRITER}, requirements_txt="tinypkg==1.0"
    )
    assert attack.stdout.split("\n")[:4] == [
        "append EROFS",
        "create EROFS",
        "remove EROFS",
        "mkdir EROFS",
    ], attack.stderr
    assert cachedir.tree_digest(site) == before
    after = await execute(
        dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt="tinypkg==1.0"
    )
    assert (after.stdout, after.deps_cache) == (first.stdout, "hit")


@pytest.fixture
def poisoned_image(tmp_path: Path, docker_client: docker.DockerClient) -> Iterator[str]:
    """The runner image plus a pip configuration that would install tinypkg 9.9 from a
    directory inside the image, and a module of its own: what a request's image could
    slip into an environment built with it."""
    poison = make_wheel(tmp_path / "poison", "tinypkg", "9.9", {"tinypkg/POISON.py": "POISON"})
    members = {
        "etc/pip.conf": b"[global]\nfind-links = /poison\n",
        f"poison/{poison.name}": poison.read_bytes(),
        "usr/lib/python3/dist-packages/poisonmark.py": b"POISON = True\n",
    }
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(content), 0o644
            archive.addfile(info, io.BytesIO(content))
    container = docker_client.containers.create(TEST_IMAGE, command=["true"])
    tag = f"pyexec-test-poisoned:{uuid.uuid4().hex[:8]}"
    try:
        container.put_archive("/", data.getvalue())
        container.commit(*tag.split(":"))
    finally:
        container.remove(force=True)
    try:
        yield tag
    finally:
        docker_client.images.remove(tag, force=True)


async def test_the_cache_never_holds_anything_of_the_requests_image(
    tmp_path: Path, docker_client: docker.DockerClient, poisoned_image: str
) -> None:
    """A request in an image with its own pip configuration and packages gets an
    environment built by the trusted image from the operator's wheels only: nothing of
    the request's image is in the cache, whose marker names the trusted builder."""
    settings = deps_settings(tmp_path, allowed_images=(poisoned_image,))
    dockers = DockerRunner(settings, docker_client)
    await dockers.startup()
    try:
        outcome = await execute(
            dockers,
            docker_client,
            settings,
            {"main.py": SHOW},
            docker_image=poisoned_image,
            requirements_txt="tinypkg",
        )
    finally:
        await dockers.aclose()
    assert outcome.reason is Reason.EXITED, (outcome.error, outcome.stderr)
    assert outcome.stdout.split()[0] == "2.0"  # the newest of the operator's wheels
    cache = tmp_path / "cache"
    found = [path for path in cache.rglob("*") if path.is_file()]
    assert found  # the environment is there ...
    assert not [p for p in found if b"POISON" in p.read_bytes() or "poison" in p.name.lower()]
    [entry] = cachedir.CacheDir(str(cache)).entries()
    assert entry.marker["describe"]["installer"]["image"] == TEST_IMAGE


async def test_a_requirement_with_no_wheel_fails_the_run_as_setup_failed(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """With no setup network, a build that fails is the run's setup_failed, naming what
    pip could not find; nothing is left in the cache."""
    settings = deps_settings(tmp_path, setup_network=False, deps_prewarm=(("nosuchpkg",),))
    dockers = DockerRunner(settings, docker_client)
    await dockers.startup()
    try:
        outcome = await execute(
            dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt="nosuchpkg"
        )
    finally:
        await dockers.aclose()
    assert outcome.reason is Reason.SETUP_FAILED
    assert outcome.error is not None
    assert "nosuchpkg" in outcome.error
    assert outcome.deps_cache == "miss"
    assert cachedir.CacheDir(str(tmp_path / "cache")).entries() == []


async def test_eval_without_setup_network_gets_a_prewarmed_set_only(tmp_path: Path) -> None:
    """PYEXEC_SETUP_NETWORK off: eval's detected import that is a prewarmed set comes from
    the cache (built once, by the prewarm or the request, and counted in /metrics); another
    import is not installed; other requirements are still refused."""
    settings = deps_settings(tmp_path, setup_network=False, deps_prewarm=(("tinypkg",),))
    async with app_client(settings) as api:
        body = {"code": "import tinypkg\ntinypkg.VERSION", "eval_last_expr": True}
        answer = (await api.post("/api/v1/eval", json=body)).json()
        assert answer["status"] == "completed", answer
        assert answer["result"] == "'2.0'"
        assert answer["auto_requirements"] == ["tinypkg"]
        assert answer["deps_cache"] in {"hit", "miss"}
        other = {"code": "import otherpkg", "eval_last_expr": True}
        answer = (await api.post("/api/v1/eval", json=other)).json()
        assert (answer["error_type"], answer["auto_requirements"]) == ("ModuleNotFoundError", [])
        assert "deps_cache" not in answer
        refused = await api.post("/api/v1/eval", json={"code": "1", "requirements_txt": "six"})
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "setup_network_unavailable"
        metrics = (await api.get("/metrics")).text
    values = dict(
        line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("pyexec_deps")
    )
    assert values['pyexec_deps_cache_build_seconds_count{outcome="ok"}'] == "1.0"
    assert float(values["pyexec_deps_cache_bytes"]) > 0
    assert (
        float(values["pyexec_deps_cache_hits_total"])
        + float(values["pyexec_deps_cache_misses_total"])
        == 1.0
    )


async def test_an_unusable_cache_directory_turns_the_cache_off(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """A cache directory that cannot be made leaves the cache off (logged): with the setup
    network on, runs install their requirements themselves; with it off they fail setup."""
    (tmp_path / "file").write_text("not a directory")
    for network, expected in ((True, "off"), (False, None)):
        settings = deps_settings(
            tmp_path,
            deps_cache_dir=str(tmp_path / "file" / "cache"),
            setup_network=network,
            deps_prewarm=(("tinypkg==1.0",),),
        )
        dockers = DockerRunner(settings, docker_client)
        assert dockers.deps is not None
        await dockers.startup()
        assert dockers.deps.available is False
        request = parse_request({"requirements_txt": "tinypkg==1.0"}, settings)
        if expected is None:
            with pytest.raises(BuildFailed, match="cache is off"):
                await dockers.deps.prepare(request)
        else:
            assert (await dockers.deps.prepare(request)).status == expected
        await dockers.aclose()


async def test_a_warm_pool_sandbox_serves_a_run_with_a_cached_environment(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Every run container mounts the environments read-only, so a pooled sandbox (made
    before its request was known) serves a run with requirements: it installs nothing
    and skips the container start too."""
    settings = deps_settings(tmp_path, pool_size=1, pool_images=(TEST_IMAGE,))
    dockers = DockerRunner(settings, docker_client)
    await dockers.startup()
    pool = dockers.pool
    assert pool is not None
    try:
        cold = await execute(
            dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt="tinypkg==1.0"
        )
        key = pool.keep(parse_request({}, settings), 1)
        await pool.wait_ready(key, 1, timeout=60)
        served = len(pool.served)
        warm = await execute(
            dockers, docker_client, settings, {"main.py": SHOW}, requirements_txt="tinypkg==1.0"
        )
    finally:
        await dockers.aclose()
    assert (warm.stdout, warm.deps_cache) == (cold.stdout, "hit")
    assert len(pool.served) == served + 1


@pytest.mark.network
async def test_eval_numpy_from_the_package_index_is_built_once(tmp_path: Path) -> None:
    """The real thing: eval's detected numpy is built by the trusted builder from the
    package index (through the CA bundle), then served from the cache."""
    settings = deps_settings(
        tmp_path,
        deps_index_url="https://pypi.org/simple",
        deps_find_links=None,
        ca_bundle=CA_BUNDLE,
        default_timeout=300,
        default_memory_mb=512,
    )
    body = {"code": "import numpy as np\nnp.arange(10).sum()", "eval_last_expr": True}
    async with app_client(settings) as api:
        answers = [(await api.post("/api/v1/eval", json=body)).json() for _ in range(2)]
    assert [(a["result"], a["deps_cache"]) for a in answers] == [
        ("np.int64(45)", "miss"),
        ("np.int64(45)", "hit"),
    ], answers


def _builder_of(client: docker.DockerClient, owner: str) -> list[str]:
    """This process's running builder containers (not its probes)."""
    found = client.api.containers(filters={"label": [f"pyexec.owner={owner}", "pyexec.deps"]})
    return [str(c["Id"]) for c in found if (c.get("Labels") or {}).get("pyexec.deps") != "probe"]


async def test_a_builder_container_killed_half_way_is_never_used_and_is_rebuilt(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """The builder hangs reading a wheel (a FIFO in the find-links directory) and is
    killed from outside: the run fails as setup_failed, nothing of the build is left or
    mounted; with the wheel in place the next run builds the environment again."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fifo = wheels / "slowpkg-1.0-py3-none-any.whl"
    os.mkfifo(fifo)  # pip blocks opening it: a build stopped half-way, every time
    settings = deps_settings(tmp_path, setup_network=False, deps_prewarm=(("slowpkg==1.0",),))
    dockers = DockerRunner(settings, docker_client)
    await dockers.startup()
    owner = owner_label()
    program = {"main.py": "import slowpkg\nprint(slowpkg.VERSION)\n"}
    try:
        run = asyncio.ensure_future(
            execute(dockers, docker_client, settings, program, requirements_txt="slowpkg==1.0")
        )
        builders = await asyncio.to_thread(_wait_for, lambda: _builder_of(docker_client, owner))
        assert os.listdir(tmp_path / "cache" / "builds")  # the build is under way
        for builder in builders:
            docker_client.api.kill(builder)
        failed = await run
        assert failed.reason is Reason.SETUP_FAILED, failed
        cache = CacheDir(str(tmp_path / "cache"))
        assert cache.entries() == []
        fifo.unlink()
        make_wheel(wheels, "slowpkg", "1.0")
        rebuilt = await execute(
            dockers, docker_client, settings, program, requirements_txt="slowpkg==1.0"
        )
    finally:
        await dockers.aclose()
    assert (rebuilt.reason, rebuilt.stdout, rebuilt.deps_cache) == (Reason.EXITED, "1.0\n", "miss")
    assert [entry.requirements for entry in cache.entries()] == [["slowpkg==1.0"]]
    assert os.listdir(tmp_path / "cache" / "builds") == []


def _wait_for(found: Callable[[], list[str]], seconds: float = 60.0) -> list[str]:
    """``found()`` once it is not empty (bounded)."""
    deadline = time.monotonic() + seconds
    while not (items := found()):
        if time.monotonic() > deadline:
            raise TimeoutError("nothing appeared")
        time.sleep(0.1)
    return items
