"""The local Docker runner of the embedded default: one fresh container per execution.

The project travels on the container's stdin, not through ``put_archive`` (which
a read-only root refuses even for a tmpfs): the bootstrap from
``pyexec.sandbox`` reads a framed spec and tar, unpacks into the /work tmpfs,
runs the setup if any, writes one control line and execs the user's program, so
the rest of stdin is the program's own. The runner attaches before it starts the
container, then feeds stdin and reads the multiplexed output on one socket,
without threads, keeping at most ``max_output_bytes`` per stream.

A request with a setup phase (requirements, pre_commands) runs it in the same
container when setup and run share a network policy; otherwise a setup container
with the network prepares a per-execution tmpfs volume that the run container,
without network, then uses. Containers and volumes carry the ``pyexec.managed``
label; every path removes them, and ``startup`` sweeps leftovers of a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import ssl
import struct
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import anyio
import attrs
import docker
import docker.errors
import requests
from anyio import from_thread, to_thread
from docker.types import LogConfig, Mount
from docker.utils import parse_repository_tag

from pyexec.errors import BackendError, BackendUnavailable, Conflict, NotFound, PyexecError
from pyexec.models import Execution, ExecutionRequest, Reason, RunOutcome, utcnow
from pyexec.runner import OnRunning
from pyexec.sandbox import bootstrap_source, wire
from pyexec.settings import Settings

__all__ = ["LABEL_EXECUTION", "LABEL_MANAGED", "DockerRunner", "Phase", "container_args", "plan"]

T = TypeVar("T")

LABEL_MANAGED = "pyexec.managed"
LABEL_EXECUTION = "pyexec.execution_id"
#: ``host:pid`` of the service process that pumps the container.
LABEL_OWNER = "pyexec.owner"
SANDBOX_USER = "1000:1000"
WORKDIR = "/work"
CA_TARGET = "/usr/local/share/pyexec/ca.crt"
MiB = 1024 * 1024

_RECV = 64 * 1024
_MUX_HEADER = struct.Struct(">BxxxL")  # stream (1 stdout, 2 stderr), 3 pad bytes, length
#: How long the host lets a setup overrun its budget before it steps in; the
#: bootstrap enforces the budget itself and reports the setup output when it can.
_SETUP_GRACE = 5.0
#: Bound on waiting for a killed container to be gone.
_KILL_WAIT = 30.0
#: Finished runs kept for ``wait``/``logs`` (their output lives in the outcome only).
_DONE_KEPT = 64
_REMOVE_ATTEMPTS = 3
_THREADS = 64


@attrs.frozen
class Phase:
    """One container of an execution."""

    extract: bool  # unpack the tar into /work
    setup: bool  # install requirements and run pre_commands
    run: bool  # run the entrypoint
    network: bool


def plan(request: ExecutionRequest, settings: Settings) -> tuple[Phase, ...]:
    """The containers an execution needs: one, or setup then run when their networks differ."""
    run_network = not request.config.network_disabled
    if not request.needs_setup:
        return (Phase(extract=True, setup=False, run=True, network=run_network),)
    if settings.setup_network == run_network:
        return (Phase(extract=True, setup=True, run=True, network=run_network),)
    return (
        Phase(extract=True, setup=True, run=False, network=settings.setup_network),
        Phase(extract=False, setup=False, run=True, network=run_network),
    )


def container_args(
    settings: Settings,
    request: ExecutionRequest,
    execution_id: str,
    phase: Phase,
    volume: str | None = None,
    owner: str = "",
) -> dict[str, Any]:
    """Arguments of ``APIClient.create_container``, with ``host_config`` as the keyword
    arguments of ``create_host_config`` (a pure function: shown and tested as data)."""
    config = request.config
    memory = config.memory_mb * MiB
    mounts = []
    tmpfs = None
    if volume is None:
        tmpfs = {
            WORKDIR: f"rw,exec,nosuid,nodev,size={config.disk_mb}m,uid=1000,gid=1000,mode=0755"
        }
    else:
        mounts.append(Mount(WORKDIR, volume, type="volume"))
    if phase.setup and settings.ca_bundle:
        mounts.append(Mount(CA_TARGET, settings.ca_bundle, type="bind", read_only=True))
    host_config: dict[str, Any] = {
        "network_mode": None if phase.network else "none",
        "read_only": True,
        "tmpfs": tmpfs,
        "mounts": mounts or None,
        "mem_limit": memory,
        "memswap_limit": memory,
        "cpu_shares": config.cpu_shares,
        "pids_limit": config.pids_limit,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "log_config": LogConfig(type="none"),
        "init": True,
    }
    return {
        "image": request.docker_image,
        "command": ["python3", "-I", "-S", "-c", bootstrap_source()],
        "user": SANDBOX_USER,
        "working_dir": WORKDIR,
        "environment": [
            f"HOME={WORKDIR}",
            f"TMPDIR={WORKDIR}/.pyexec/tmp",
            "PYTHONUNBUFFERED=1",
        ],
        "labels": {
            LABEL_MANAGED: "1",
            LABEL_EXECUTION: execution_id,
            LABEL_OWNER: owner,
            "pyexec.phase": "run" if phase.run else "setup",
        },
        "stdin_open": True,
        "detach": False,  # with stdin_open: attach stdin/stdout/stderr, close stdin at EOF
        "tty": False,
        "host_config": host_config,
    }


def bootstrap_spec(settings: Settings, request: ExecutionRequest, phase: Phase) -> dict[str, Any]:
    """What the in-container bootstrap is told to do (the first frame on its stdin)."""
    env = dict(request.env_vars)
    spec: dict[str, Any] = {
        "extract": phase.extract,
        "limits": {
            "max_entries": settings.max_tar_entries,
            "max_bytes": settings.max_extracted_bytes,
        },
    }
    if phase.setup:
        setup_env = dict(env)
        if settings.ca_bundle:
            for name in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
                setup_env[name] = CA_TARGET
        spec["setup"] = {
            "requirements": request.requirements_txt,
            "commands": list(request.pre_commands),
            "timeout": request.config.timeout_seconds,
            "env": setup_env,
            "max_output": request.config.max_output_bytes,
        }
    if phase.run:
        spec["run"] = {
            "entrypoint": request.entrypoint,
            "args": list(request.script_args),
            "env": env,
        }
    return spec


class _Capture:
    """One output stream, kept up to ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def feed(self, chunk: bytes) -> bool:
        """Keep ``chunk``; ``False`` once the stream went over its limit."""
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.data += chunk[: max(room, 0)]
            self.truncated = True
            return False
        self.data += chunk
        return True

    def text(self, *, final: bool = True) -> str:
        data = bytes(self.data)
        if self.truncated or not final:
            data = _cut_partial_utf8(data)
        return data.decode("utf-8", errors="replace")


def _cut_partial_utf8(data: bytes) -> bytes:
    """Drop a multibyte character cut off at the end (by the cap, or not yet complete)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        needed = (
            2
            if byte >> 5 == 0b110
            else 3
            if byte >> 4 == 0b1110
            else 4
            if byte >> 3 == 0b11110
            else 1
        )
        return data[:-back] if back < needed else data
    return data


class _Demux:
    """Docker's multiplexed attach stream (tty off), parsed as it arrives."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._stream = 0
        self._left = 0

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        view = memoryview(data)
        while view:
            if not self._left:
                need = _MUX_HEADER.size - len(self._header)
                self._header += view[:need]
                view = view[need:]
                if len(self._header) == _MUX_HEADER.size:
                    self._stream, self._left = _MUX_HEADER.unpack(self._header)
                    self._header.clear()
                continue
            piece = view[: self._left]
            view = view[len(piece) :]
            self._left -= len(piece)
            yield self._stream, bytes(piece)


class _Socket:
    """The attach connection, non-blocking, driven by the event loop."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle  # keeps docker-py's wrapper (and its response) alive
        raw = getattr(handle, "_sock", handle)
        if not isinstance(raw, socket.socket):
            raise BackendError(
                "this Docker connection type does not give a socket to attach to",
                code="runner_error",
            )
        self.sock = raw
        self.sock.setblocking(False)

    async def recv(self) -> bytes:
        while True:
            try:
                return self.sock.recv(_RECV)
            except (BlockingIOError, ssl.SSLWantReadError):
                await anyio.wait_readable(self.sock)
            except (ConnectionResetError, BrokenPipeError):
                return b""

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view) :]
            except (BlockingIOError, ssl.SSLWantWriteError):
                await anyio.wait_writable(self.sock)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        close = getattr(self._handle, "close", None)
        if close is not None:
            close()


@attrs.define(eq=False)
class _Run:
    execution_id: str
    request: ExecutionRequest
    stdout: _Capture
    stderr: _Capture
    containers: list[str] = attrs.Factory(list)
    volume: str | None = None
    killed: bool = False
    verdict: Reason | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    keeper: tuple[str, _Socket] | None = None
    task: asyncio.Task[RunOutcome] | None = None
    launch_error: Exception | None = None

    def outcome(self, reason: Reason, error: str | None = None) -> RunOutcome:
        return RunOutcome(
            reason=reason,
            exit_code=self.exit_code,
            stdout=self.stdout.text(),
            stderr=self.stderr.text(),
            output_truncated=self.stdout.truncated or self.stderr.truncated,
            started_at=self.started_at,
            finished_at=self.finished_at or utcnow(),
            error=error,
        )


class _Ended(Exception):
    """The execution is over before its last phase (killed, or a phase failed)."""

    def __init__(self, outcome: RunOutcome) -> None:
        super().__init__(outcome.reason.value)
        self.outcome = outcome


class DockerRunner:
    """The ``Runner`` for one machine with a local Docker engine."""

    #: A local run is pumped by this process; it cannot outlive it.
    survives_restart = False

    def __init__(self, settings: Settings, client: docker.DockerClient | None = None) -> None:
        self._settings = settings
        self._client = client
        self._owns_client = client is None
        self._client_lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._done: OrderedDict[str, _Run] = OrderedDict()
        self._limiter = anyio.CapacityLimiter(_THREADS)
        self._closed = False
        self._owner = f"{socket.gethostname()}:{os.getpid()}"

    # --- Runner protocol ---------------------------------------------------------------

    async def startup(self) -> None:
        await self._sweep({LABEL_MANAGED: "1"}, spare_live_owners=True)

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
    ) -> None:
        if self._closed:
            raise BackendUnavailable("the runner is shutting down", code="shutting_down")
        execution_id = execution.execution_id
        if execution_id in self._runs:
            raise Conflict(f"{execution_id} is already running", code="already_exists")
        limit = request.config.max_output_bytes
        run = _Run(execution_id, request, _Capture(limit), _Capture(limit))
        self._runs[execution_id] = run
        launched = asyncio.Event()
        task = asyncio.create_task(self._drive(run, tar, on_running, launched))
        task.add_done_callback(lambda _: launched.set())
        run.task = task
        try:
            await launched.wait()
        except BaseException:
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
            raise
        if run.launch_error is not None:
            raise run.launch_error
        if task.cancelled():
            raise BackendUnavailable("the runner is shutting down", code="shutting_down")

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        run = self._find(execution_id)
        if run is None or run.task is None:
            raise NotFound(f"no run of {execution_id} on this runner")
        done, _ = await asyncio.wait({run.task}, timeout=timeout)
        if not done:
            raise TimeoutError(f"{execution_id} still running after {timeout}s")
        if run.task.cancelled():
            return run.outcome(Reason.ERROR, "the runner shut down before the run finished")
        return run.task.result()

    async def logs(self, execution_id: str) -> tuple[str, str]:
        run = self._find(execution_id)
        if run is None:
            return "", ""
        if run.task is not None and run.task.done() and not run.task.cancelled():
            outcome = run.task.result()
            return outcome.stdout, outcome.stderr
        return run.stdout.text(final=False), run.stderr.text(final=False)

    async def kill(self, execution_id: str) -> None:
        run = self._runs.get(execution_id)
        if run is None:
            await self._sweep({LABEL_EXECUTION: execution_id})
            return
        run.killed = True
        for container in list(run.containers):
            await self._kill_container(container)
        if run.task is not None:
            await asyncio.wait({run.task}, timeout=_KILL_WAIT)

    async def resume(self, execution: Execution) -> bool:
        # The output of a local container is only ever read by the process that
        # attached to it; after a restart nobody can pump it, and startup swept it.
        return False

    async def ping(self) -> None:
        try:
            await self._call(lambda api: api.ping())
        except BackendError as exc:
            raise BackendUnavailable(
                f"Docker is not reachable: {exc.message}", code="runner_unavailable"
            ) from exc

    async def aclose(self) -> None:
        self._closed = True
        tasks = {run.task for run in self._runs.values() if run.task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_KILL_WAIT)
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None

    # --- One execution -----------------------------------------------------------------

    async def _drive(
        self,
        run: _Run,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        launched: asyncio.Event,
    ) -> RunOutcome:
        outcome = await self._drive_phases(run, tar, on_running, launched)
        run.stdout.data, run.stderr.data = bytearray(), bytearray()  # the outcome has the text
        return outcome

    async def _drive_phases(
        self,
        run: _Run,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        launched: asyncio.Event,
    ) -> RunOutcome:
        try:
            phases = plan(run.request, self._settings)
            if len(phases) > 1:
                run.volume = await self._create_volume(run)
            for phase in phases:
                await self._phase(run, phase, tar, on_running, launched)
            raise AssertionError("the last phase always ends the execution")  # pragma: no cover
        except _Ended as ended:
            return ended.outcome
        except Exception as raised:  # noqa: BLE001 - every failure becomes the run's outcome or start's error
            exc = _unwrap(raised)
            if not launched.is_set():
                run.launch_error = (
                    exc
                    if isinstance(exc, PyexecError)
                    else BackendError(f"could not start the run: {exc}", code="runner_error")
                )
            message = (
                exc.message if isinstance(exc, BackendError) else f"{type(exc).__name__}: {exc}"
            )
            return run.outcome(Reason.ERROR, f"the run failed: {message}")
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(run)
            launched.set()
            self._runs.pop(run.execution_id, None)
            if run.launch_error is None:
                self._done[run.execution_id] = run
                while len(self._done) > _DONE_KEPT:
                    self._done.popitem(last=False)

    async def _phase(
        self,
        run: _Run,
        phase: Phase,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        launched: asyncio.Event,
    ) -> None:
        """Run one container to its end; raises ``_Ended`` when the execution is over.

        A successful setup-only container is not ended but kept idle (``run.keeper``)
        until the run container has started: a tmpfs volume is unmounted, and its
        contents lost, as soon as no running container uses it.
        """
        request = run.request
        args = container_args(
            self._settings, request, run.execution_id, phase, run.volume, self._owner
        )
        spec = wire.spec_frame(bootstrap_spec(self._settings, request, phase))
        container = await self._create(args)
        run.containers.append(container)
        if run.killed:
            raise _Ended(run.outcome(Reason.KILLED))
        handle = await self._call(
            lambda api: api.attach_socket(
                container, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
            )
        )
        conn = _Socket(handle)
        control = wire.ControlLine()
        try:
            await self._call(lambda api: api.start(container))
            await self._drop_keeper(run)
            budget = float(request.config.timeout_seconds)
            if phase.setup:
                deadline = anyio.current_time() + budget + _SETUP_GRACE
            else:
                await self._begin(run, on_running)
                deadline = anyio.current_time() + budget
            stdin = request.stdin.encode() if phase.run else None
            async with anyio.create_task_group() as group:
                group.start_soon(
                    self._feed, conn, spec, tar if phase.extract else None, stdin, launched
                )
                deadline = await self._pump(run, conn, control, phase, on_running, deadline)
                group.cancel_scope.cancel()
            if control.status == "setup_ok" and run.verdict is None and not run.killed:
                run.keeper = (container, conn)
                return
        except BaseException:
            conn.close()
            raise
        conn.close()
        if run.verdict is not None:
            await self._kill_container(container)
        exited = await self._wait_exit(run, container, phase, control, deadline)
        run.finished_at = utcnow()
        oom = exited == 137 and run.verdict is None and await self._oom_killed(container)
        await self._remove_container(run, container)
        self._judge(run, phase, control, exited, oom)

    async def _drop_keeper(self, run: _Run) -> None:
        """End the idle setup container once the run container holds the volume."""
        if run.keeper is not None:
            container, conn = run.keeper
            run.keeper = None
            conn.close()
            await self._remove_container(run, container)

    def _judge(
        self, run: _Run, phase: Phase, control: wire.ControlLine, exited: int | None, oom: bool
    ) -> None:
        """Raise ``_Ended`` with the outcome, unless a successful setup-only phase ended."""
        run.exit_code = exited
        status = control.status
        setup_over = status in {"ready", "setup_ok"}
        if run.verdict is not None:
            reason = run.verdict
            if phase.setup and not setup_over:
                reason = Reason.SETUP_FAILED
            raise _Ended(run.outcome(reason, run.error))
        if run.killed:
            raise _Ended(run.outcome(Reason.KILLED))
        if status == "setup_failed":
            error = control.message
            raise _Ended(run.outcome(Reason.SETUP_FAILED, str(error or "setup failed")))
        if oom:
            limit = run.request.config.memory_mb
            raise _Ended(
                run.outcome(Reason.OOM, f"killed for using more than {limit} MiB of memory")
            )
        if status == "error" or status is None:
            detail = control.message or f"exit {exited} before the program ran"
            raise _Ended(run.outcome(Reason.ERROR, f"the sandbox could not start: {detail}"))
        if status == "setup_ok" and not phase.run:
            run.exit_code = None
            return
        raise _Ended(run.outcome(Reason.EXITED))

    async def _begin(self, run: _Run, on_running: OnRunning) -> None:
        run.started_at = utcnow()
        await on_running(run.started_at)

    async def _feed(
        self,
        conn: _Socket,
        spec: bytes,
        tar: AsyncIterator[bytes] | None,
        stdin: bytes | None,
        launched: asyncio.Event,
    ) -> None:
        """Write the framed spec and tar, then the program's stdin and EOF (``stdin``
        is ``None`` for a setup-only container, which must stay up until told)."""
        try:
            await conn.send(spec)
            if tar is not None:
                await self._send_archive(conn, tar)
            await conn.send(wire.END)
            launched.set()
            if stdin is not None:
                await conn.send(stdin)
                conn.shutdown_write()
        except OSError:
            # The container ended without reading all its input; its outcome says why.
            launched.set()

    async def _send_archive(self, conn: _Socket, tar: AsyncIterator[bytes]) -> None:
        """Unpack the tar's framing here, member by member, so the sandbox needs no tarfile."""
        chunks = aiter(tar)

        async def next_chunk() -> bytes:
            async for chunk in chunks:
                if chunk:
                    return chunk
            return b""

        def work() -> None:
            wire.encode_archive(
                lambda: from_thread.run(next_chunk),
                lambda data: from_thread.run(conn.send, data),
            )

        await to_thread.run_sync(work, limiter=self._limiter)

    async def _pump(
        self,
        run: _Run,
        conn: _Socket,
        control: wire.ControlLine,
        phase: Phase,
        on_running: OnRunning,
        deadline: float,
    ) -> float:
        """Read output until the stream ends, a stream overflows or the deadline passes;
        returns the deadline then in force (the run's, once a setup gave way to it)."""
        demux = _Demux()
        with anyio.CancelScope(deadline=deadline) as scope:
            while data := await conn.recv():
                for stream, payload in demux.feed(data):
                    if stream == 1 and not control.done:
                        payload = control.feed(payload)
                        if control.status == "ready" and phase.setup:
                            await self._begin(run, on_running)
                            scope.deadline = (
                                anyio.current_time() + run.request.config.timeout_seconds
                            )
                        elif control.status == "setup_ok":
                            return scope.deadline
                    if stream not in (1, 2) or not payload:
                        continue
                    capture = run.stdout if stream == 1 else run.stderr
                    if not capture.feed(payload):
                        run.verdict = Reason.OUTPUT_LIMIT
                        which = "stdout" if stream == 1 else "stderr"
                        run.error = f"{which} exceeded {capture.limit} bytes"
                        return scope.deadline
        if scope.cancelled_caught:
            self._timed_out(run, phase, control)
        return scope.deadline

    def _timed_out(self, run: _Run, phase: Phase, control: wire.ControlLine) -> None:
        timeout = run.request.config.timeout_seconds
        run.verdict = Reason.TIMEOUT
        if phase.setup and control.status not in {"ready", "setup_ok"}:
            run.error = f"setup did not finish within {timeout}s"
        else:
            run.error = f"the run exceeded its timeout of {timeout}s"

    async def _wait_exit(
        self, run: _Run, container: str, phase: Phase, control: wire.ControlLine, deadline: float
    ) -> int | None:
        """The container's exit code, once it exits; a container that closed its output
        but keeps running is stopped when its time is up."""
        if run.verdict is None:
            # Its output ended, so it has normally exited already and this returns at once.
            remaining = max(deadline - anyio.current_time(), 1.0)
            code = await self._wait_container(container, remaining)
            if code is not None:
                return code
            self._timed_out(run, phase, control)
            await self._kill_container(container)
        return await self._wait_container(container, _KILL_WAIT)

    # --- Docker calls --------------------------------------------------------------------

    def _api(self) -> docker.APIClient:
        with self._client_lock:
            if self._client is None:
                self._client = docker.DockerClient(
                    base_url=self._settings.docker_host, max_pool_size=_THREADS
                )
            return self._client.api

    async def _call(self, fn: Callable[[docker.APIClient], T]) -> T:
        """Run ``fn(api)`` in a worker thread; Docker errors become pyexec errors
        (``docker.errors.NotFound`` passes through for callers that expect it)."""
        try:
            return await to_thread.run_sync(lambda: fn(self._api()), limiter=self._limiter)
        except docker.errors.NotFound:
            raise
        except docker.errors.APIError as exc:
            raise BackendError(f"Docker: {exc.explanation or exc}", code="runner_error") from exc
        except (requests.exceptions.RequestException, docker.errors.DockerException) as exc:
            raise BackendUnavailable(
                f"Docker is not reachable: {exc}", code="runner_unavailable"
            ) from exc

    async def _create(self, args: dict[str, Any]) -> str:
        def create(api: docker.APIClient) -> str:
            kwargs = dict(args, host_config=api.create_host_config(**args["host_config"]))
            return str(api.create_container(**kwargs)["Id"])

        image = args["image"]
        try:
            return await self._call(create)
        except docker.errors.ImageNotFound:
            if not self._settings.docker_pull:
                raise BackendError(
                    f"the image {image!r} is not available locally (pulling is off)",
                    code="image_unavailable",
                    image=image,
                ) from None
        repository, tag = parse_repository_tag(image)
        try:
            await self._call(lambda api: api.pull(repository, tag=tag or "latest"))
            return await self._call(create)
        except (docker.errors.NotFound, BackendError) as exc:
            detail = exc.message if isinstance(exc, BackendError) else str(exc)
            raise BackendError(
                f"the image {image!r} is not available locally and could not be pulled: {detail}",
                code="image_unavailable",
                image=image,
            ) from exc

    async def _create_volume(self, run: _Run) -> str:
        size = run.request.config.disk_mb
        volume = await self._call(
            lambda api: api.create_volume(
                driver="local",
                driver_opts={
                    "type": "tmpfs",
                    "device": "tmpfs",
                    "o": f"size={size}m,uid=1000,gid=1000,mode=0755",
                },
                labels={
                    LABEL_MANAGED: "1",
                    LABEL_EXECUTION: run.execution_id,
                    LABEL_OWNER: self._owner,
                },
            )
        )
        return str(volume["Name"])

    async def _wait_container(self, container: str, timeout: float) -> int | None:
        """Exit code, or ``None`` if the container still runs after ``timeout`` seconds."""
        try:
            seconds = math.ceil(timeout)
            result = await self._call(lambda api: api.wait(container, timeout=seconds))
        except BackendUnavailable as exc:
            if isinstance(exc.__cause__, requests.exceptions.ReadTimeout):
                return None
            raise
        except docker.errors.NotFound:
            return None
        return int(result["StatusCode"])

    async def _oom_killed(self, container: str) -> bool:
        state = await self._call(lambda api: api.inspect_container(container))
        return bool(state["State"].get("OOMKilled"))

    async def _kill_container(self, container: str) -> None:
        try:
            await self._call(lambda api: api.kill(container))
        except docker.errors.NotFound:
            return
        except BackendError as exc:
            if "is not running" not in exc.message:
                raise

    async def _remove_container(self, run: _Run, container: str) -> None:
        for attempt in range(_REMOVE_ATTEMPTS):
            try:
                await self._call(partial(_remove_container, container))
            except docker.errors.NotFound:
                break
            except BackendError as exc:
                if "already in progress" in exc.message:
                    break  # someone else's removal finishes the job
                if attempt + 1 == _REMOVE_ATTEMPTS:
                    raise
                # The engine sometimes refuses while the container is still dying.
                await anyio.sleep(0.2 * 2**attempt)
            else:
                break
        if container in run.containers:
            run.containers.remove(container)

    async def _release(self, run: _Run) -> None:
        """Remove whatever the run still holds; safe to repeat."""
        await self._drop_keeper(run)
        for container in list(run.containers):
            await self._remove_container(run, container)
        if run.volume is not None:
            with contextlib.suppress(docker.errors.NotFound):
                await self._call(partial(_remove_volume, run.volume))
            run.volume = None

    async def _sweep(self, labels: dict[str, str], *, spare_live_owners: bool = False) -> None:
        """Remove every container and volume carrying ``labels`` (leftovers, or a late kill).

        With ``spare_live_owners``, what a live pyexec process on this host still pumps
        is left alone: nothing else can read its output, but that process can.
        """
        selector = [f"{key}={value}" for key, value in labels.items()]
        containers = await self._call(
            lambda api: api.containers(all=True, filters={"label": selector})
        )
        for item in containers:
            if spare_live_owners and _owner_alive((item.get("Labels") or {}).get(LABEL_OWNER)):
                continue
            with contextlib.suppress(docker.errors.NotFound):
                await self._call(partial(_remove_container, item["Id"]))
        volumes = await self._call(lambda api: api.volumes(filters={"label": selector}))
        for item in (volumes or {}).get("Volumes") or []:
            if spare_live_owners and _owner_alive((item.get("Labels") or {}).get(LABEL_OWNER)):
                continue
            with contextlib.suppress(docker.errors.NotFound):
                await self._call(partial(_remove_volume, item["Name"]))

    def _find(self, execution_id: str) -> _Run | None:
        return self._runs.get(execution_id) or self._done.get(execution_id)


def _remove_container(container: str, api: docker.APIClient) -> None:
    api.remove_container(container, v=True, force=True)


def _remove_volume(volume: str, api: docker.APIClient) -> None:
    api.remove_volume(volume, force=True)


def _owner_alive(owner: str | None) -> bool:
    """Whether ``host:pid`` names a live process on this host (so not a crash's leftover)."""
    host, _, pid = (owner or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unwrap(exc: Exception) -> Exception:
    """The one error inside (nested) task-group exception groups, if there is just one."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
