"""The dependency cache of the local Docker runner: a host directory, a builder container.

Why a host directory (``PYEXEC_DEPS_CACHE_DIR``) rather than named volumes: the cache
rules need plain file operations the service can do itself, without starting a
container for each: ``flock`` (one builder per key across replicas on the host; use
locks that eviction respects, released by the kernel when a process dies), an atomic
``rename`` to publish a verified build, reading markers and sizes for ``/metrics``,
``pyexec cache ls`` and eviction. Every run container mounts the finished environments
read-only (``docker_spec.deps_root``), one shape for all runs, so the warm pool serves
runs with requirements too; the bootstrap puts the run's own environment on its path.

The builder is a container of the trusted image (``Settings.deps_builder``, never the
request's) running ``build_env.py`` as the service's own user, with only its build
directory writable, a read-only root, no capabilities, the network only when an index
is configured. The request's image is run once per image, without network and with
nothing mounted, to read its Python version and C library (``probe``): that decides
the key's target, and nothing of the image reaches the cache.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import docker.errors

from pyexec.errors import BackendError
from pyexec.models import ExecutionRequest
from pyexec.runner.docker_engine import Engine
from pyexec.runner.docker_spec import CA_TARGET, DEPS_TARGET, LABEL_MANAGED, LABEL_OWNER, NOFILE
from pyexec.settings import MiB, Settings

from .cache import BuildFailed, DepsCache, DepsObserver, Lease, builder_source
from .key import EnvKey, Installer, NotCacheable, Target, normalise_requirements, platform_tags

__all__ = [
    "BUILD_TARGET",
    "DEPS_TARGET",
    "FIND_LINKS_TARGET",
    "DockerBuilder",
    "DockerDeps",
    "Prepared",
    "builder_args",
    "probe_args",
]

#: Where the builder sees its build directory and the operator's wheels.
BUILD_TARGET = "/opt/pyexec/build"
FIND_LINKS_TARGET = "/opt/pyexec/find-links"
#: Labels of the builder and probe containers (with the managed and owner labels).
LABEL_DEPS = "pyexec.deps"
BUILDER_MEMORY = 2048 * MiB
BUILDER_TMP = "rw,nosuid,nodev,size=1g,mode=1777"
PROBE_MEMORY = 128 * MiB
PROBE_TIMEOUT = 60.0
PROBE = (
    "import platform,sys;l=platform.libc_ver();"
    "print('%d.%d'%sys.version_info[:2],platform.machine(),l[0] or 'musl',l[1] or '1.2')"
)
#: What the runner is told of each prewarmed environment once it is ready: an image it
#: was built for (several images of one Python share it), its key.
Prewarmed = Callable[[str, EnvKey], Awaitable[None]]
#: Build output kept for a failed run's record (from the end).
OUTPUT_BYTES = 16 * 1024


def _locked_down(settings: Settings, memory: int, network: bool) -> dict[str, Any]:
    return {
        "network_mode": None if network else "none",
        "read_only": True,
        "tmpfs": {"/tmp": BUILDER_TMP},
        "mem_limit": memory,
        "memswap_limit": memory,
        "pids_limit": 256,
        "ulimits": [docker.types.Ulimit(name="nofile", soft=NOFILE, hard=NOFILE)],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
    }


def installer(settings: Settings) -> Installer:
    return Installer(
        image=settings.deps_builder,
        index_url=settings.deps_index_url,
        find_links=settings.deps_find_links,
    )


def builder_args(
    settings: Settings, key: EnvKey, build: str, owner: str, user: str
) -> dict[str, Any]:
    """``APIClient.create_container`` arguments of the builder of ``key`` (pure data)."""
    job = {
        "key": key.digest,
        "describe": key.describe(),
        "requirements": list(key.requirements),
        "python": key.target.python,
        "platforms": list(platform_tags(key.target)),
        "only_binary": key.installer.only_binary,
        "index_url": key.installer.index_url,
        "find_links": FIND_LINKS_TARGET if key.installer.find_links else None,
        "build": BUILD_TARGET,
    }
    mounts = [docker.types.Mount(BUILD_TARGET, build, type="bind", read_only=False)]
    if key.installer.find_links:
        mounts.append(
            docker.types.Mount(
                FIND_LINKS_TARGET, key.installer.find_links, type="bind", read_only=True
            )
        )
    env = {"PYEXEC_DEPS_JOB": json.dumps(job), "PIP_CONFIG_FILE": "/dev/null"}
    if settings.ca_bundle and key.installer.index_url:
        mounts.append(
            docker.types.Mount(CA_TARGET, settings.ca_bundle, type="bind", read_only=True)
        )
        env.update(dict.fromkeys(("SSL_CERT_FILE", "PIP_CERT"), CA_TARGET))
    host_config = _locked_down(settings, BUILDER_MEMORY, network=bool(key.installer.index_url))
    host_config["mounts"] = mounts
    return {
        "image": key.installer.image,
        "entrypoint": [],
        "command": ["python3", "-I", "-c", builder_source()],
        "user": user,
        "working_dir": "/tmp",
        "environment": [f"{name}={value}" for name, value in env.items()],
        "labels": {LABEL_MANAGED: "1", LABEL_OWNER: owner, LABEL_DEPS: key.digest},
        "host_config": host_config,
    }


def probe_args(settings: Settings, image: str, owner: str) -> dict[str, Any]:
    """Arguments of the container that reads ``image``'s Python and C library: the
    sandbox's lockdown, no network, no mounts, the sandbox user."""
    return {
        "image": image,
        "entrypoint": [],
        "command": ["python3", "-I", "-S", "-c", PROBE],
        "user": "1000:1000",
        "labels": {LABEL_MANAGED: "1", LABEL_OWNER: owner, LABEL_DEPS: "probe"},
        "host_config": {
            **_locked_down(settings, PROBE_MEMORY, network=False),
            "runtime": settings.docker_runtime,
        },
    }


class _Container:
    """Create, run to its end within a bound, read and remove one helper container."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def run(self, args: dict[str, Any], timeout: float) -> tuple[int | None, bytes]:
        made: list[str] = []
        try:
            container = await self._engine.create(args, on_created=made.append)
            await self._engine.start(container)
            code = await self._engine.wait(container, timeout)
            if code is None:
                await self._engine.kill(container)
            stdout, stderr = await self._engine.output(container)
            return code, stdout + stderr
        finally:
            for container in made:
                try:
                    await self._engine.remove_container(container)
                except BackendError as exc:
                    logging.getLogger("pyexec.deps").warning(
                        "could not remove %s: %s", container, exc.message
                    )


class DockerBuilder:
    """Builds environments in a container of the trusted image (``builder_args``)."""

    def __init__(self, settings: Settings, engine: Engine, owner: str) -> None:
        self._settings = settings
        self._container = _Container(engine)
        self._owner = owner

    async def build(self, key: EnvKey, build: str) -> None:
        user = f"{os.getuid()}:{os.getgid()}"
        args = builder_args(self._settings, key, build, self._owner, user)
        try:
            code, output = await self._container.run(args, self._settings.deps_build_timeout)
        except BackendError as exc:
            raise BuildFailed(f"the builder could not run: {exc.message}") from None
        text = output.decode("utf-8", "replace")[-OUTPUT_BYTES:]
        if code is None:
            raise BuildFailed("the builder did not finish in time", text)
        if code != 0:
            missing = [
                line.split(" for ", 1)[1].strip()
                for line in text.splitlines()
                if "No matching distribution found for" in line
            ]
            detail = f"; no wheel for Python {key.target.python}: {', '.join(missing)}"
            raise BuildFailed(
                f"building the environment failed (pip exit code {code})"
                + (detail if missing else ""),
                text,
            )


@attrs.frozen
class Prepared:
    """What the runner gets for a request with requirements."""

    #: ``hit``, ``miss`` or ``off`` (the run installs its requirements itself).
    status: str
    lease: Lease | None = None


class DockerDeps:
    """The local runner's side of the cache: the key of a request, its lease."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        owner: str,
        observer: DepsObserver | None = None,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._owner = owner
        self._targets: dict[str, Target] = {}
        self.cache = DepsCache(
            settings.deps_cache_dir,
            DockerBuilder(settings, engine, owner),
            cap_bytes=settings.deps_cache_bytes,
            build_timeout=settings.deps_build_timeout,
            observer=observer,
            # A run container adopted after a restart holds no lease: what was used within
            # the longest run time stays.
            grace=float(settings.max_timeout),
        )
        #: Off when the cache directory cannot be made (logged).
        self.available = False

    def make_dirs(self) -> None:
        """Make the cache directory's layout (at once: run containers' shape needs it)."""
        try:
            self.cache.dir.prepare()
        except OSError as exc:
            logging.getLogger("pyexec.deps").warning(
                "deps cache off: cannot use %s: %s", self._settings.deps_cache_dir, exc
            )
            return
        self.available = True

    async def startup(self, prewarmed: Prewarmed | None = None) -> None:
        """Sweep what killed builds left, then prewarm in the background; ``prewarmed`` is
        awaited with each image and the key built for it, once it is ready."""
        if not self.available:
            return
        await self.cache.startup()
        if self._settings.deps_prewarm:
            image = self._settings.default_image
            versions = dict.fromkeys([image, *(i for _, i in self._settings.python_images)])
            self.cache.prewarm(self._prewarm_keys(list(versions)), prewarmed)

    async def _prewarm_keys(self, images: list[str]) -> AsyncIterator[tuple[str, EnvKey]]:
        """Each image with each set's key for it (images of one Python share keys: a
        second lease of one is a hit)."""
        for image in images:
            try:
                target = await self.target(image)
            except BuildFailed as exc:
                logging.getLogger("pyexec.deps").warning("deps prewarm: %s", exc.message)
                continue
            for requirements in self._settings.deps_prewarm:
                yield image, EnvKey(requirements, target, installer(self._settings))

    async def target(self, image: str) -> Target:
        """The Python and platform of ``image`` (probed once per image id)."""
        try:
            found = await self._engine.call(
                lambda api: api.inspect_image(image)  # type: ignore[no-untyped-call] # untyped in docker's stubs
            )
            image_id = str(found["Id"])
        except docker.errors.NotFound:
            image_id = image  # not pulled yet: the probe's create pulls it (if allowed)
        if image_id in self._targets:
            return self._targets[image_id]
        try:
            code, output = await _Container(self._engine).run(
                probe_args(self._settings, image, self._owner), PROBE_TIMEOUT
            )
        except BackendError as exc:
            raise BuildFailed(f"could not read the Python of {image}: {exc.message}") from None
        parts = output.decode("utf-8", "replace").split()
        if code != 0 or len(parts) != 4:
            raise BuildFailed(f"could not read the Python of {image} (python3 -c exit {code})")
        target = Target(python=parts[0], machine=parts[1], libc=parts[2], libc_version=parts[3])
        self._targets[image_id] = target
        return target

    async def prepare(self, request: ExecutionRequest) -> Prepared:
        """The environment of ``request``'s requirements, leased (release it when the run
        is over); ``off`` when the run must install them itself. Raises ``BuildFailed``."""
        if self._settings.deps_cache_bytes <= 0 or not self.available:
            if self._settings.setup_network:
                return Prepared("off")
            raise BuildFailed("the dependency cache is off, and the setup phase has no network")
        try:
            requirements = normalise_requirements(request.requirements_txt)
        except NotCacheable as exc:
            if self._settings.setup_network:
                return Prepared("off")
            raise BuildFailed(f"the requirements cannot be cached: {exc}") from None
        key = EnvKey(
            requirements, await self.target(request.docker_image), installer(self._settings)
        )
        try:
            lease = await self.cache.lease(key)
        except BuildFailed as exc:
            if not self._settings.setup_network:
                raise
            logging.getLogger("pyexec.deps").info(
                "deps cache: %s; the run installs its requirements itself", exc.message
            )
            return Prepared("off")
        return Prepared(lease.status, lease)

    async def aclose(self) -> None:
        await self.cache.aclose()
