"""The dependency cache's rules (``pyexec.deps``), with builders that stand in for the
trusted one through the ``Builder`` seam (no container, no package index)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from pyexec.deps import cachedir
from pyexec.deps.cache import Builder, BuildFailed, DepsCache, NullDepsObserver, builder_source
from pyexec.deps.cachedir import CacheDir
from pyexec.deps.key import (
    EnvKey,
    Installer,
    NotCacheable,
    Target,
    normalise_requirements,
    platform_tags,
)

pytestmark = pytest.mark.anyio

TARGET = Target(python="3.11", machine="x86_64", libc="glibc", libc_version="2.36")
INSTALLER = Installer(image="trusted:1", index_url=None, find_links="/wheels")


def key_of(text: str, target: Target = TARGET) -> EnvKey:
    return EnvKey(normalise_requirements(text), target, INSTALLER)


class FileBuilder:
    """Writes one module per requirement and the marker last; counts its builds."""

    def __init__(self, size: int = 10, gate: asyncio.Event | None = None) -> None:
        self.builds: list[str] = []
        self.size = size
        self.gate = gate

    async def build(self, key: EnvKey, build: str) -> None:
        self.builds.append(key.digest)
        if self.gate is not None:
            await self.gate.wait()
        for requirement in key.requirements:
            _write(build, f"{requirement[:4]}.py", "x" * self.size)
        cachedir.write_marker(build, key.digest, key.describe())


def _write(build: str, name: str, text: str) -> None:
    Path(build, "site", name).write_text(text)


def _read(site: str, name: str) -> str:
    return Path(site, name).read_text()


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _listdir(path: str | Path) -> list[str]:
    return sorted(os.listdir(path))


def _keys(cache: DepsCache) -> set[str]:
    return {entry.key for entry in cache.dir.entries()}


def make_cache(
    root: Path, builder: Builder, *, cap_bytes: int = 10**9, build_timeout: float = 30.0
) -> DepsCache:
    return DepsCache(str(root), builder, cap_bytes=cap_bytes, build_timeout=build_timeout)


# --- The key -----------------------------------------------------------------------------


def test_spellings_of_one_requirement_set_are_one_key() -> None:
    """Names, extras and specifiers are normalised and sorted; comments do not count."""
    one = key_of("NumPy>=1.0, <3\n# comment\npandas[Excel,performance]  # why\n")
    other = key_of("pandas[performance,excel]\nnumpy<3,>=1.0\n\n")
    assert one.digest == other.digest
    assert one.requirements == ("numpy<3,>=1.0", "pandas[excel,performance]")


def test_a_different_pin_target_or_installer_is_a_different_key() -> None:
    """Another pin, Python, libc or installer option never shares an environment."""
    base = key_of("numpy==1.26.4")
    assert key_of("numpy==2.1.0").digest != base.digest
    assert key_of("numpy").digest != base.digest
    other_python = Target(python="3.12", machine="x86_64", libc="glibc", libc_version="2.36")
    assert key_of("numpy==1.26.4", other_python).digest != base.digest
    musl = Target(python="3.11", machine="x86_64", libc="musl", libc_version="1.2")
    assert key_of("numpy==1.26.4", musl).digest != base.digest
    indexed = EnvKey(base.requirements, TARGET, Installer("trusted:1", "https://x/simple", None))
    assert indexed.digest != base.digest


@pytest.mark.parametrize(
    "line",
    [
        "-e .",
        "--index-url https://evil/simple",
        "pkg @ https://evil/pkg.whl",
        "https://evil/pkg.whl",
        "./local",
        "pkg; python_version < '3.12'",
        "pkg ==",
        "pkg extra",
    ],
)
def test_urls_paths_markers_and_options_are_not_cacheable(line: str) -> None:
    """The trusted builder is only ever given names and versions, never what to fetch."""
    with pytest.raises(NotCacheable):
        normalise_requirements(line)


def test_platform_tags_never_ask_for_a_newer_libc_than_the_target() -> None:
    """glibc 2.36 takes manylinux_2_36 down to manylinux1; musl its own tags only."""
    tags = platform_tags(TARGET)
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_37_x86_64" not in tags
    assert {"manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    musl = platform_tags(Target(python="3.12", machine="aarch64", libc="musl", libc_version="1.2"))
    assert musl == ("musllinux_1_2_aarch64", "musllinux_1_1_aarch64", "musllinux_1_0_aarch64")


def test_the_builder_source_compiles_with_the_rules_after_it() -> None:
    """What the trusted image runs is one valid program (the builder, then the rules)."""
    source = builder_source()
    compile(source, "<builder>", "exec")
    assert source.count("from __future__") == 1
    assert source.rstrip().endswith("main()")


# --- Building once ---------------------------------------------------------------------------


async def test_two_concurrent_cold_requests_build_once(tmp_path: Path) -> None:
    """The second request for a missing environment waits for the first one's build."""
    gate = asyncio.Event()
    builder = FileBuilder(gate=gate)
    cache = make_cache(tmp_path, builder)
    await cache.startup()
    key = key_of("tinypkg==1.0")
    async with anyio.create_task_group() as group:
        leases = []

        async def take() -> None:
            leases.append(await cache.lease(key))

        group.start_soon(take)
        group.start_soon(take)
        with anyio.fail_after(10):
            # Until both wait for the one build (bounded; the cache signals nothing here).
            while cache.waiting() != {key.digest: 2}:  # noqa: ASYNC110 - a polled count
                await anyio.sleep(0.01)
        gate.set()
    assert builder.builds == [key.digest]
    assert [lease.status for lease in leases] == ["miss", "miss"]
    assert leases[0].site == leases[1].site == cache.dir.site(key.digest)
    for lease in leases:
        lease.release()
    assert (await cache.lease(key)).status == "hit"


async def test_two_processes_on_one_directory_build_once(tmp_path: Path) -> None:
    """Two caches on one directory (as two replicas on one host) share one build: the
    build lock is a file lock, not the process's own bookkeeping."""
    gate = asyncio.Event()
    first, second = FileBuilder(gate=gate), FileBuilder(gate=gate)
    caches = [make_cache(tmp_path, first), make_cache(tmp_path, second)]
    await caches[0].startup()
    key = key_of("tinypkg==1.0")
    async with anyio.create_task_group() as group:
        for cache in caches:
            group.start_soon(cache.lease, key)
        with anyio.fail_after(10):
            # Until one builds (held at the gate) while the other waits for it.
            while not (first.builds or second.builds) or any(  # noqa: ASYNC110 - polled
                c.waiting() != {key.digest: 1} for c in caches
            ):
                await anyio.sleep(0.01)
        # The build lock is held on the directory itself: no third process gets it either.
        assert CacheDir(str(tmp_path)).try_build_lock(key.digest) is None
        gate.set()
    assert len(first.builds) + len(second.builds) == 1


async def test_a_waiter_gives_up_within_the_build_timeout(tmp_path: Path) -> None:
    """A build that never ends fails its waiters after the build timeout, not later."""
    cache = make_cache(tmp_path, FileBuilder(gate=asyncio.Event()), build_timeout=0.5)
    await cache.startup()
    with anyio.fail_after(5), pytest.raises(BuildFailed, match=r"0\.5 s"):
        await cache.lease(key_of("tinypkg"))
    assert cache.dir.ready(key_of("tinypkg").digest) is None
    await cache.aclose()


# --- Only finished, verified builds ----------------------------------------------------------


class KilledBuilder:
    """A builder process killed (SIGKILL) half-way: it wrote part of the environment."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    async def build(self, key: EnvKey, build: str) -> None:
        script = (
            "import pathlib, sys, time\n"
            f"pathlib.Path({build!r}, 'site', 'half.py').write_text('half')\n"
            "print('half', flush=True)\n"
            "time.sleep(60)\n"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        self.pids.append(proc.pid)
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"half\n"
        os.kill(proc.pid, signal.SIGKILL)
        code = await proc.wait()
        raise BuildFailed(f"the builder exited with {code}")


async def test_a_build_killed_half_way_is_never_used_and_is_rebuilt(tmp_path: Path) -> None:
    """The half-written build is never published nor left behind; the next request for
    the key builds it again, and gets the complete environment."""
    key = key_of("tinypkg==1.0")
    killed = make_cache(tmp_path, KilledBuilder())
    await killed.startup()
    with pytest.raises(BuildFailed, match="-9"):
        await killed.lease(key)
    assert killed.dir.ready(key.digest) is None
    assert not _listdir(tmp_path / "envs")
    assert not _listdir(tmp_path / "builds")
    builder = FileBuilder()
    lease = await make_cache(tmp_path, builder).lease(key)
    assert builder.builds == [key.digest]
    assert lease.status == "miss"
    assert sorted(_listdir(lease.site)) == ["tiny.py"]


async def test_a_builder_process_that_died_leaves_a_build_the_next_builder_removes(
    tmp_path: Path,
) -> None:
    """A build directory of a process killed outright (no cleanup ran) is swept."""
    cache = CacheDir(str(tmp_path))
    cache.prepare()
    key = key_of("tinypkg").digest
    orphan = cache.new_build(key)
    _write(orphan, "half.py", "half")
    fd = cache.try_build_lock(key)
    assert fd is not None
    assert not _exists(orphan)
    assert cache.ready(key) is None
    cache.unlock(fd)


class TamperingBuilder(FileBuilder):
    """Writes the marker, then changes a file: the tree no longer matches it."""

    async def build(self, key: EnvKey, build: str) -> None:
        await super().build(key, build)
        _write(build, "extra.py", "added after the marker")


async def test_a_build_that_does_not_match_its_marker_is_never_published(
    tmp_path: Path,
) -> None:
    """The digest in the marker is checked against the tree before anything is used."""
    cache = make_cache(tmp_path, TamperingBuilder())
    await cache.startup()
    with pytest.raises(BuildFailed, match="marker"):
        await cache.lease(key_of("tinypkg"))
    assert not _listdir(tmp_path / "envs")
    assert not _listdir(tmp_path / "builds")


async def test_a_build_without_a_marker_is_never_published(tmp_path: Path) -> None:
    """A builder that installed everything but did not write the marker built nothing."""

    class NoMarker:
        async def build(self, key: EnvKey, build: str) -> None:
            _write(build, "pkg.py", "x")

    cache = make_cache(tmp_path, NoMarker())
    await cache.startup()
    with pytest.raises(BuildFailed):
        await cache.lease(key_of("tinypkg"))
    assert cache.dir.ready(key_of("tinypkg").digest) is None


# --- Eviction ------------------------------------------------------------------------------------


async def test_eviction_under_the_cap_keeps_environments_in_use(tmp_path: Path) -> None:
    """Past the cap the least recently used environments go, but never one in use."""
    builder = FileBuilder(size=1000)
    cache = make_cache(tmp_path, builder, cap_bytes=2500)
    await cache.startup()
    keys = [key_of(name) for name in ("aaaa", "bbbb", "cccc", "dddd")]
    held = await cache.lease(keys[0])  # the oldest, but in use throughout
    for key in keys[1:3]:
        (await cache.lease(key)).release()
        await anyio.sleep(0.02)  # distinct last-use times
    # Three of 1000 bytes went over the cap: bbbb went, aaaa (older, in use) stayed.
    assert _keys(cache) == {keys[0].digest, keys[2].digest}
    newest = await cache.lease(keys[3])
    assert _keys(cache) == {keys[0].digest, keys[3].digest}
    assert cache.used_bytes() <= 2500
    assert _read(held.site, "aaaa.py") == "x" * 1000
    held.release()
    newest.release()


async def test_eviction_removes_nothing_while_everything_is_in_use(tmp_path: Path) -> None:
    """A cache over its cap with every environment in use keeps them all (for now)."""
    cache = make_cache(tmp_path, FileBuilder(size=1000), cap_bytes=10)
    await cache.startup()
    leases = [await cache.lease(key_of(name)) for name in ("aaaa", "bbbb")]
    assert len(cache.dir.entries()) == 2
    assert all(e.in_use for e in cache.dir.entries())
    for lease in leases:
        lease.release()
    assert cache.dir.evict(10)
    assert cache.dir.entries() == []


async def test_an_evicted_environment_is_built_again_when_asked_for(tmp_path: Path) -> None:
    """Eviction forgets an environment; the next request for it is a miss that rebuilds."""
    builder = FileBuilder()
    cache = make_cache(tmp_path, builder)
    await cache.startup()
    key = key_of("tinypkg")
    (await cache.lease(key)).release()
    assert cache.dir.remove(key.digest)
    assert (await cache.lease(key)).status == "miss"
    assert len(builder.builds) == 2


async def test_prewarming_builds_in_the_background(tmp_path: Path) -> None:
    """prewarm returns at once; the environments are ready once it has run, and it tells
    the caller of each one, with what it was built for, once it is (a failed build is
    skipped, logged)."""
    gate = asyncio.Event()
    builder = FileBuilder(gate=gate)
    cache = make_cache(tmp_path, builder)
    both_built = anyio.Event()

    class Observer(NullDepsObserver):
        def deps_built(self, seconds: float, ok: bool) -> None:
            if len(builder.builds) == 2:
                both_built.set()

    cache.observer = Observer()
    await cache.startup()

    async def keys() -> AsyncIterator[tuple[str, EnvKey]]:
        yield "first", key_of("aaaa")
        yield "second", key_of("bbbb")

    told: list[tuple[str, EnvKey]] = []
    all_told = anyio.Event()

    async def ready(item: str, key: EnvKey) -> None:
        assert cache.dir.ready(key.digest) is not None
        told.append((item, key))
        if len(told) == 2:
            all_told.set()

    cache.prewarm(keys(), ready)
    await anyio.sleep(0.1)
    assert cache.dir.entries() == []  # still building: start-up was not held up
    assert told == []
    gate.set()
    with anyio.fail_after(10):
        await both_built.wait()
        await all_told.wait()
    assert len(cache.dir.entries()) == 2
    assert all(not entry.in_use for entry in cache.dir.entries())
    assert told == [("first", key_of("aaaa")), ("second", key_of("bbbb"))]
    await cache.aclose()


async def test_eviction_spares_environments_used_within_the_grace(tmp_path: Path) -> None:
    """With a grace, an environment used that recently stays even with no lease (a run
    adopted after a restart, a Nomad run task about to take its lock)."""
    cache = make_cache(tmp_path, FileBuilder())
    await cache.startup()
    key = key_of("tinypkg")
    (await cache.lease(key)).release()
    assert cache.dir.evict(0, grace=3600) == []
    assert cache.dir.evict(0) == [key.digest]
