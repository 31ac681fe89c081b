"""The Docker Engine calls of the local runner, each in a worker thread.

docker-py is blocking; ``Engine`` runs every call through one capacity limiter and
turns Docker's errors into pyexec's (``docker.errors.NotFound`` passes through for
callers that expect it). Removing and killing what is already gone succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import anyio
import docker
import docker.errors
import requests
import urllib3.exceptions
from anyio import from_thread, to_thread
from docker.utils import parse_repository_tag

from pyexec.errors import BackendError, BackendUnavailable
from pyexec.runner.docker_spec import LABEL_OWNER
from pyexec.runner.docker_stream import AttachSocket
from pyexec.settings import Settings

__all__ = ["Engine", "owner_alive", "owner_label"]

T = TypeVar("T")

_REMOVE_ATTEMPTS = 3
#: Longest single blocking ``wait`` call (seconds).
_WAIT_SLICE = 2.0
THREADS = 64


class Engine:
    """One Docker client (opened on first use) and the calls the runner makes with it."""

    def __init__(
        self,
        settings: Settings,
        client: docker.DockerClient | None = None,
        *,
        threads: int = THREADS,
    ) -> None:
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._client_lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(threads)

    def _api(self) -> docker.APIClient:
        with self._client_lock:
            if self._client is None:
                self._client = docker.DockerClient(
                    base_url=self._settings.docker_host, max_pool_size=THREADS
                )
            return self._client.api

    async def call(
        self,
        fn: Callable[[docker.APIClient], T],
        *,
        limiter: anyio.CapacityLimiter | None = None,
        abandon_on_cancel: bool = False,
    ) -> T:
        """Run ``fn(api)`` in a worker thread (of ``limiter``, by default the engine's);
        Docker errors become pyexec errors (``docker.errors.NotFound`` passes through for
        callers that expect it)."""
        try:
            return await to_thread.run_sync(
                lambda: fn(self._api()),
                limiter=limiter or self._limiter,
                abandon_on_cancel=abandon_on_cancel,
            )
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker: {exc.explanation or exc}", code="runner_error") from exc
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise BackendUnavailable(
                f"Docker is not reachable: {exc}", code="runner_unavailable"
            ) from exc

    async def call_to_end(self, fn: Callable[[docker.APIClient], T]) -> T:
        """Like ``call``, but a caller cancelled meanwhile still waits for the worker
        thread to finish before it unwinds (a cancelled task otherwise leaves at once,
        and its cleanup would run before the engine made what the call creates)."""
        call = asyncio.ensure_future(self.call(fn))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            with anyio.CancelScope(shield=True):  # a cancelled anyio scope would re-cancel
                await asyncio.wait({call})
            if not call.cancelled():
                call.exception()  # retrieved: the cancellation is what goes on
            raise

    async def ping(self) -> None:
        try:
            await self.call(lambda api: api.ping())
        except BackendError as exc:
            raise BackendUnavailable(
                f"Docker is not reachable: {exc.message}", code="runner_unavailable"
            ) from exc

    async def create(self, args: dict[str, Any], on_created: Callable[[str], None]) -> str:
        """Create a container from ``container_args``; pull the image first if allowed.

        ``on_created`` gets the id in the worker thread, as soon as the engine made it:
        the caller learns of it even if it is cancelled while the call is under way.
        """

        def create(api: docker.APIClient) -> str:
            host_config = api.create_host_config(**args["host_config"])
            host_config.update(args.get("host_config_extra") or {})
            kwargs = {k: v for k, v in args.items() if k != "host_config_extra"}
            kwargs["host_config"] = host_config
            container = str(api.create_container(**kwargs)["Id"])
            on_created(container)
            return container

        image = args["image"]
        try:
            return await self.call_to_end(create)
        except docker.errors.ImageNotFound:
            if not self._settings.docker_pull:
                raise BackendError(
                    f"the image {image!r} is not available locally (pulling is off)",
                    code="image_unavailable",
                    image=image,
                ) from None
        repository, tag = parse_repository_tag(image)
        try:
            await self.call(lambda api: api.pull(repository, tag=tag or "latest"))
            return await self.call_to_end(create)
        except (docker.errors.NotFound, BackendError) as exc:
            detail = exc.message if isinstance(exc, BackendError) else str(exc)
            raise BackendError(
                f"the image {image!r} is not available locally and could not be pulled: {detail}",
                code="image_unavailable",
                image=image,
            ) from exc

    async def create_volume(self, args: dict[str, Any], on_created: Callable[[str], None]) -> str:
        """Create a volume from ``volume_args``; ``on_created`` as for ``create``."""

        def create(api: docker.APIClient) -> str:
            volume = str(api.create_volume(**args)["Name"])
            on_created(volume)
            return volume

        return await self.call_to_end(create)

    async def attach(self, container: str) -> AttachSocket:
        """The container's stdin, stdout and stderr, as one connection. A caller cancelled
        while the engine answers waits for the answer and closes it (as ``create`` keeps
        what it made): no socket is left to the garbage collector."""
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        handles: list[Any] = []

        def attach(api: docker.APIClient) -> Any:
            handle = api.attach_socket(container, params=params)
            handles.append(handle)
            return handle

        try:
            return AttachSocket(await self.call_to_end(attach))
        except BaseException:
            for handle in handles:
                with contextlib.suppress(Exception):  # whatever state its socket is in
                    AttachSocket(handle).close()
            raise

    async def start(self, container: str) -> None:
        await self.call(lambda api: api.start(container))

    async def wait(self, container: str, timeout: float) -> int | None:
        """Exit code, or ``None`` if the container still runs after ``timeout`` seconds.

        The wait is made of calls of at most ``_WAIT_SLICE`` seconds, so that a container
        which runs on for an hour does not hold a worker thread (and queue everyone's
        creates and kills behind it) for that long.
        """
        deadline = anyio.current_time() + timeout
        while True:
            remaining = deadline - anyio.current_time()
            seconds = max(1, math.ceil(min(remaining, _WAIT_SLICE)))
            try:
                result = await self.call(partial(_wait, container, seconds))
            except BackendUnavailable as exc:
                if not _read_timeout(exc.__cause__):
                    raise
                if anyio.current_time() >= deadline:
                    return None
                continue
            except docker.errors.NotFound:
                return None
            return int(result["StatusCode"])

    async def oom_killed(self, container: str) -> bool:
        state = await self.call(lambda api: api.inspect_container(container))
        return bool(state["State"].get("OOMKilled"))

    async def kill(self, container: str, signal: str = "SIGKILL") -> None:
        try:
            await self.call(lambda api: api.kill(container, signal=signal))
        except docker.errors.NotFound:
            return
        except BackendError as exc:
            if "is not running" not in exc.message:
                raise

    async def remove_container(self, container: str) -> None:
        for attempt in range(_REMOVE_ATTEMPTS):
            try:
                await self.call(partial(_remove_container, container))
            except docker.errors.NotFound:
                return
            except BackendError as exc:
                if "already in progress" in exc.message:
                    return  # someone else's removal finishes the job
                if attempt + 1 == _REMOVE_ATTEMPTS:
                    raise
                # The engine sometimes refuses while the container is still dying.
                await anyio.sleep(0.2 * 2**attempt)
            else:
                return

    async def remove_volume(self, volume: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await self.call(partial(_remove_volume, volume))

    async def sweep(
        self,
        labels: dict[str, str],
        *,
        spare_live_owners: bool = False,
        spare: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Remove every container and volume carrying ``labels`` (leftovers, or a late kill).

        With ``spare_live_owners``, what a live pyexec process on this host still pumps
        is left alone: nothing else can read its output, but that process can. What
        ``spare`` says yes to (given the engine's listing of it) is left alone too.
        """
        selector = [f"{key}={value}" for key, value in labels.items()]
        containers = await self.containers(labels)

        def spared(item: dict[str, Any]) -> bool:
            found = item.get("Labels") or {}
            if spare_live_owners and owner_alive(found.get(LABEL_OWNER)):
                return True
            return spare is not None and spare(item)

        for item in containers:
            if spared(item):
                continue
            with contextlib.suppress(docker.errors.NotFound):
                await self.call(partial(_remove_container, item["Id"]))
        volumes = await self.call(lambda api: api.volumes(filters={"label": selector}))
        for item in (volumes or {}).get("Volumes") or []:
            if spared(item):
                continue
            await self.remove_volume(item["Name"])

    async def containers(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Every container (running or not) carrying ``labels``, as the engine lists them."""
        selector = [f"{key}={value}" for key, value in labels.items()]
        found = await self.call(lambda api: api.containers(all=True, filters={"label": selector}))
        return list(found)

    async def volumes(self, labels: dict[str, str]) -> list[str]:
        """Names of the volumes carrying ``labels``."""
        selector = [f"{key}={value}" for key, value in labels.items()]
        found = await self.call(lambda api: api.volumes(filters={"label": selector}))
        return [str(item["Name"]) for item in (found or {}).get("Volumes") or []]

    async def inspect(self, container: str) -> dict[str, Any]:
        state: dict[str, Any] = await self.call(lambda api: api.inspect_container(container))
        return state

    async def output(self, container: str) -> tuple[bytes, bytes]:
        """What the engine's log kept of a container's stdout and stderr."""

        def read(api: docker.APIClient, *, stdout: bool) -> bytes:
            return bytes(api.logs(container, stdout=stdout, stderr=not stdout))

        return (
            await self.call(partial(read, stdout=True)),
            await self.call(partial(read, stdout=False)),
        )

    async def follow(
        self,
        container: str,
        on_data: Callable[[int, bytes], None],
        limiter: anyio.CapacityLimiter,
    ) -> None:
        """Hand ``on_data`` (in the event loop) what the engine's log holds of the
        container's stdout (1) and stderr (2), from its start and as it grows, until the
        container has ended and all of it is read. Each stream takes a worker thread of
        ``limiter`` (not the engine's: it is held for as long as the container runs)."""
        async with anyio.create_task_group() as group:
            for stream in (1, 2):
                group.start_soon(self._follow_stream, container, stream, on_data, limiter)

    async def _follow_stream(
        self,
        container: str,
        stream: int,
        on_data: Callable[[int, bytes], None],
        limiter: anyio.CapacityLimiter,
    ) -> None:
        readers: list[Any] = []
        over = False
        delivered = 0

        def deliver(data: bytes) -> None:
            nonlocal delivered
            if data and not over:  # (an abandoned reader may still hand one over)
                delivered += len(data)
                on_data(stream, data)

        def read(api: docker.APIClient) -> None:
            reader = api.logs(
                container, stdout=stream == 1, stderr=stream == 2, stream=True, follow=True
            )
            readers.append(reader)
            if over:  # abandoned while the engine answered: the finally below missed it
                reader.close()
                return
            for data in reader:
                from_thread.run_sync(deliver, bytes(data))

        def read_all(api: docker.APIClient) -> bytes:
            return bytes(api.logs(container, stdout=stream == 1, stderr=stream == 2))

        try:
            await self.call(read, limiter=limiter, abandon_on_cancel=True)
            # A follow can end as the container does before it has the log's last
            # entries: whatever the whole log holds beyond what came is handed over too.
            deliver((await self.call(read_all))[delivered:])
        except docker.errors.NotFound:
            return  # gone: there is nothing more to read
        finally:
            over = True
            for reader in readers:
                with contextlib.suppress(Exception):  # whatever state its socket is in
                    reader.close()

    def close(self) -> None:
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None


def _wait(container: str, seconds: int, api: docker.APIClient) -> Any:
    return api.wait(container, timeout=seconds)


def _read_timeout(exc: BaseException | None) -> bool:
    """Whether ``exc`` is requests timing out on a read (some adapters wrap that in a
    ``ConnectionError`` instead of raising ``ReadTimeout``)."""
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        return isinstance(exc.args[0], urllib3.exceptions.ReadTimeoutError)
    return False


def _remove_container(container: str, api: docker.APIClient) -> None:
    api.remove_container(container, v=True, force=True)


def _remove_volume(volume: str, api: docker.APIClient) -> None:
    api.remove_volume(volume, force=True)


def owner_label() -> str:
    """``host:pid:start`` naming this process (``start``: when it started, in clock ticks
    since boot), so that a later process reusing the pid is told apart: PID 1 of a
    restarted container has the same host name and pid as the one that crashed."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid)}"


def _start_ticks(pid: int) -> str:
    """Field 22 of ``/proc/<pid>/stat`` (empty where there is no such file)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return ""
    fields = stat.rpartition(b")")[2].split()  # the name in parentheses may hold spaces
    return fields[19].decode() if len(fields) > 19 else ""


def owner_alive(owner: str | None) -> bool:
    """Whether ``owner`` (``host:pid[:start]``) names a live process on this host (so not
    a crash's leftover)."""
    host, _, rest = (owner or "").partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _start_ticks(int(pid)) in ("", start)
