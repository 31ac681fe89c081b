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

What the containers are made of is data (``docker_spec``); the attach stream is
``docker_stream``; the engine calls are ``docker_engine``. This module drives one
execution through its phases and decides its verdict.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from typing import Any

import anyio
import attrs
import docker
from anyio import from_thread, to_thread

from pyexec.artifacts import ArtifactStream, blob_overhead, new_nonce
from pyexec.deps.cache import BuildFailed, Lease
from pyexec.deps.docker import DockerDeps
from pyexec.deps.key import EnvKey
from pyexec.deps.preload import preload_modules
from pyexec.errors import (
    BackendError,
    BackendUnavailable,
    BadRequest,
    Conflict,
    NotFound,
    PyexecError,
)
from pyexec.models import Execution, ExecutionRequest, Reason, RunOutcome, parse_request, utcnow
from pyexec.runner import OnOutput, OnRunning
from pyexec.runner.docker_engine import THREADS, Engine, owner_alive, owner_label
from pyexec.runner.docker_pool import LABEL_POOL, DockerPool, Sandbox, served_execution
from pyexec.runner.docker_spec import (
    LABEL_EXECUTION,
    LABEL_MANAGED,
    LABEL_NONCE,
    LABEL_OWNER,
    LABEL_PHASE,
    Phase,
    artifact_grace,
    bootstrap_spec,
    container_args,
    deps_path,
    plan,
    volume_args,
)
from pyexec.runner.docker_stream import AttachSocket, Capture, Demux
from pyexec.runner.docker_verdict import Ending, verdict
from pyexec.sandbox import Preload, wire
from pyexec.settings import Settings

__all__ = ["DockerRunner"]

log = logging.getLogger("pyexec.runner.docker")

#: How long the host lets a setup overrun its budget before it steps in; the
#: bootstrap enforces the budget itself and reports the setup output when it can.
_SETUP_GRACE = 5.0
#: Bound on waiting for a killed container to be gone.
_KILL_WAIT = 30.0
#: How long run containers a crashed process left wait for ``resume`` after ``startup``.
_ADOPTION_WINDOW = 300.0
#: Finished runs kept for ``wait``/``logs`` (their output lives in the outcome only).
_DONE_KEPT = 64
#: Finished runs whose containers may still be being removed (in the background, once
#: their outcome is known); a new run waits for one of them to end first, so the
#: containers left behind by finished runs never outnumber this.
_PENDING_REMOVALS = 8
#: Output (characters) of finished runs kept once ``wait`` has handed their outcome
#: over; past it the oldest such runs are dropped (64 runs could hold 8 GiB otherwise).
_COLLECTED_OUTPUT_KEPT = 16 * 1024 * 1024


@attrs.define(eq=False)
class _Run:
    execution_id: str
    request: ExecutionRequest
    stdout: Capture
    stderr: Capture
    containers: list[str] = attrs.Factory(list)
    volume: str | None = None
    killed: bool = False
    verdict: Reason | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    keeper: tuple[str, AttachSocket] | None = None
    task: asyncio.Task[RunOutcome] | None = None
    launch_error: Exception | None = None
    #: ``wait`` has returned the outcome (whoever runs the execution has it now).
    collected: bool = False
    #: How its requirements are served (``RunOutcome.deps_cache``) and, when cached, the
    #: key of the environment the program gets (the run container sees them all, read-only).
    deps_cache: str | None = None
    deps_key: str | None = None
    #: Gets the output as it is captured (live output), if anybody asked.
    on_output: OnOutput | None = None
    #: The artifacts on the run container's stdout, when the request asks for some.
    artifacts: ArtifactStream | None = None

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
            deps_cache=self.deps_cache,
            # Asked for and not (yet) collected: left out. ``_drive`` puts in what came.
            artifacts_truncated=bool(self.request.artifacts),
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
    launch_allowance = 0.0
    #: The tar is streamed into the container from the upload; the store never holds it.
    reads_stored_tar = False

    def __init__(
        self,
        settings: Settings,
        client: docker.DockerClient | None = None,
        *,
        engine: Engine | None = None,
        adoption_window: float = _ADOPTION_WINDOW,
        pooled: bool | None = None,
        pending_removals: int = _PENDING_REMOVALS,
    ) -> None:
        """``pooled``: keep a warm pool (``docker_pool``); by default when settings pool
        an image. A pool made here holds what settings ask for; more shapes can be kept
        with ``pool.keep``. ``pending_removals``: see ``_PENDING_REMOVALS``."""
        self._settings = settings
        self._adoption_window = adoption_window
        self._orphan_sweep: asyncio.Task[None] | None = None
        self._engine = engine or Engine(settings, client)
        # Archive transfers last as long as a sandbox takes to unpack: they get their own
        # threads, so they never queue the engine calls of other runs (creates, kills).
        self._archive_threads = anyio.CapacityLimiter(THREADS)
        # Adopted runs' engine logs are followed in threads of their own too (two per run,
        # for as long as it runs); past this many, a log is read once a thread is free.
        self._follow_threads = anyio.CapacityLimiter(THREADS)
        self._runs: dict[str, _Run] = {}
        self._done: OrderedDict[str, _Run] = OrderedDict()
        #: Per finished execution, the removal of what its run still held (``_dispose``).
        self._removals: dict[str, asyncio.Task[None]] = {}
        self._pending_removals = pending_removals
        self._closed = False
        self._owner = owner_label()
        #: The dependency cache (``pyexec.deps``), unless PYEXEC_DEPS_CACHE_BYTES is 0. Its
        #: directory is made first: whether it exists decides the shape of every run
        #: container (``docker_spec.deps_root``), the pool's included.
        self.deps = (
            DockerDeps(settings, self._engine, self._owner)
            if settings.deps_cache_bytes > 0
            else None
        )
        if self.deps is not None:
            self.deps.make_dirs()
        if pooled is None:
            pooled = bool(settings.pooled_images)
        self.pool = (
            DockerPool.from_settings(self._engine, settings, self._owner) if pooled else None
        )
        #: Per prewarmed environment with preloaded sandboxes in the pool (by key digest):
        #: what they import, and the lease that keeps the environment from eviction.
        self._preloads: dict[str, tuple[Preload, Lease]] = {}
        #: The pool's shape of each preloaded set: (image, requirements joined by spaces).
        self.preloaded: dict[tuple[str, str], str] = {}

    # --- Runner protocol ---------------------------------------------------------------

    async def startup(self) -> None:
        """Sweep what crashed processes left, except their run containers: ``resume``
        adopts those (the engine's log kept their output), and what nobody adopts within
        the adoption window is swept then."""
        orphans = {
            execution_id
            for item in await self._engine.containers({LABEL_MANAGED: "1", LABEL_PHASE: "run"})
            if not owner_alive((item.get("Labels") or {}).get(LABEL_OWNER))
            and (execution_id := _execution_of(item)) is not None
        }
        await self._engine.sweep(
            {LABEL_MANAGED: "1"},
            spare_live_owners=True,
            spare=lambda item: _execution_of(item) in orphans,
        )
        if orphans:
            self._orphan_sweep = asyncio.create_task(self._sweep_orphans(orphans))
        if self.pool is not None:
            self.pool.start()
        if self.deps is not None:
            preloads = self.pool is not None and self._settings.deps_pool_size > 0
            await self.deps.startup(self._prewarmed if preloads else None)

    def check(self, request: ExecutionRequest) -> None:
        """Refuse what no process can be given: a NUL byte in an argument, an environment
        value or a setup command (they travel as C strings). Everything else
        ``parse_request`` lets through runs here as asked."""
        fields = {
            "script_args": request.script_args,
            "env_vars": [value for _, value in request.env_vars],
            "pre_commands": request.pre_commands,
            "entrypoint": [request.entrypoint],
        }
        for field, values in fields.items():
            if any("\0" in value for value in values):
                raise BadRequest(
                    f"{field} contains a NUL byte, which no program can be given",
                    code="nul_in_argument",
                    field=field,
                )

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        *,
        on_output: OnOutput | None = None,
    ) -> None:
        if self._closed:
            raise BackendUnavailable("the runner is shutting down", code="shutting_down")
        execution_id = execution.execution_id
        await self._make_room()
        if execution_id in self._runs:
            raise Conflict(f"{execution_id} is already running", code="already_exists")
        limit = request.config.max_output_bytes
        run = _Run(execution_id, request, Capture(limit), Capture(limit), on_output=on_output)
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
        outcome = run.task.result()
        run.collected = True
        self._trim_done()
        return outcome

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
            await self._sweep_execution(execution_id)
            return
        run.killed = True
        if await self._stop_for_artifacts(run):
            return
        for container in list(run.containers):
            await self._engine.kill(container)
        if run.task is not None:
            await asyncio.wait({run.task}, timeout=_KILL_WAIT)

    async def _stop_for_artifacts(self, run: _Run) -> bool:
        """A kill of a running program whose request asks for artifacts: stop the sandbox
        (SIGTERM, which init hands to the bootstrap: it ends the program, sends the files
        and exits) and wait out the artifacts' grace; ``True`` once the run is over."""
        if run.artifacts is None or run.task is None or not run.containers:
            return False
        await self._engine.kill(run.containers[-1], signal="SIGTERM")
        done, _ = await asyncio.wait({run.task}, timeout=artifact_grace(run.request))
        return bool(done)

    async def resume(self, execution: Execution, *, on_output: OnOutput | None = None) -> bool:
        """Adopt the run container a crashed process left for ``execution``: wait for it
        (the sandbox enforces its deadline itself) and judge it from the engine's state
        and log. ``False`` when there is none, or it never started. Its output is read
        from the engine's log as it grows, from the start (``on_output`` gets it all), and
        its artifacts with the nonce its label keeps."""
        execution_id = execution.execution_id
        request = execution.request
        if request is None or execution_id in self._runs or self._closed:
            return False
        found = await self._engine.containers({LABEL_EXECUTION: execution_id, LABEL_PHASE: "run"})
        found += [
            item
            for item in await self._engine.containers({LABEL_POOL: "1"})
            if served_execution(item) == execution_id
        ]
        adoptable = [
            item
            for item in found
            if not owner_alive((item.get("Labels") or {}).get(LABEL_OWNER))
            and item.get("State") != "created"
        ]
        if not adoptable:
            return False
        container = str(adoptable[0]["Id"])
        limit = request.config.max_output_bytes
        run = _Run(
            execution_id,
            request,
            Capture(limit),
            Capture(limit),
            containers=[container],
            on_output=on_output,
        )
        nonce = (adoptable[0].get("Labels") or {}).get(LABEL_NONCE)
        if request.artifacts and nonce:
            cap = request.config.max_artifact_bytes + blob_overhead()
            run.artifacts = ArtifactStream(nonce, cap)
        volumes = await self._engine.volumes({LABEL_EXECUTION: execution_id})
        run.volume = volumes[0] if volumes else None
        self._runs[execution_id] = run
        run.task = asyncio.create_task(self._adopted(run, container, execution.started_at))
        return True

    async def ping(self) -> None:
        await self._engine.ping()

    async def aclose(self) -> None:
        self._closed = True
        if self._orphan_sweep is not None:
            self._orphan_sweep.cancel()
        tasks = {run.task for run in self._runs.values() if run.task is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_KILL_WAIT)
        removals = set(self._removals.values())
        if removals:
            _, late = await asyncio.wait(removals, timeout=_KILL_WAIT)
            for removal in late:  # what is left is swept by the next ``startup``
                removal.cancel()
        if self.pool is not None:
            await self.pool.aclose()
        for _, lease in self._preloads.values():
            lease.release()
        self._preloads.clear()
        if self.deps is not None:
            await self.deps.aclose()
        self._engine.close()

    # --- Runs adopted after a restart ---------------------------------------------------

    async def _adopted(self, run: _Run, container: str, started_at: datetime | None) -> RunOutcome:
        """The outcome of an adopted run container, with its artifacts when it has some."""
        outcome = await self._watch(run, container, started_at)
        run.stdout.data, run.stderr.data = bytearray(), bytearray()  # the outcome has the text
        if run.artifacts is not None:
            outcome = await self._with_artifacts(run, run.artifacts, outcome)
        return outcome

    async def _watch(self, run: _Run, container: str, started_at: datetime | None) -> RunOutcome:
        """The outcome of an adopted run container, once it has ended; its output is read
        from the engine's log as it comes (from its start: whoever gets ``on_output``
        skips what it had)."""
        try:
            state = (await self._engine.inspect(container))["State"]
            run.started_at = started_at or _engine_time(state.get("StartedAt"))
            ran = (utcnow() - run.started_at).total_seconds() if run.started_at else 0.0
            request = run.request
            budget = request.config.timeout_seconds + _SETUP_GRACE + artifact_grace(request)
            phase = plan(request, self._settings)[-1]
            control, trailer = wire.ControlLine(), wire.Trailer()
            over = anyio.Event()
            read = partial(self._adopted_output, run, control, trailer, over)
            failed: list[PyexecError] = []
            async with anyio.create_task_group() as group:
                followed = anyio.Event()

                async def follow() -> None:
                    try:
                        await self._engine.follow(container, read, self._follow_threads)
                    except PyexecError as exc:
                        failed.append(exc)
                    followed.set()

                async def end_when_over() -> None:
                    """Past the output limit the run ends as a watched one does: stopped
                    (SIGTERM: the bootstrap sends the artifacts first) or killed."""
                    await over.wait()
                    signal = "SIGTERM" if run.artifacts is not None else "SIGKILL"
                    try:
                        await self._engine.kill(container, signal=signal)
                    except PyexecError as exc:  # it still ends at its deadline
                        log.warning("could not end %s past its output limit: %s", container, exc)

                group.start_soon(follow)
                group.start_soon(end_when_over)
                exited = await self._engine.wait(container, max(budget - ran, 1.0))
                if exited is None:  # the sandbox's own deadline did not end it
                    self._timed_out(run, phase, control)
                    await self._engine.kill(container)
                    exited = await self._engine.wait(container, _KILL_WAIT)
                with anyio.move_on_after(_KILL_WAIT):  # the log ends with the container
                    await followed.wait()
                group.cancel_scope.cancel()
            if failed:
                raise failed[0]
            state = (await self._engine.inspect(container))["State"]
            run.finished_at = _engine_time(state.get("FinishedAt")) or utcnow()
            if run.verdict is None:
                self._capture(run, 2, trailer.finish())
            if run.artifacts is not None and run.verdict is None:
                self._capture(run, 1, run.artifacts.finish())
            await self._discard(run, container)
            self._judge(run, phase, control, trailer, exited, bool(state.get("OOMKilled")))
            raise AssertionError("a run container always ends the execution")  # pragma: no cover
        except _Ended as ended:
            return ended.outcome
        except PyexecError as exc:
            return run.outcome(Reason.ERROR, f"the adopted run failed: {exc.message}")
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(run)
            self._runs.pop(run.execution_id, None)
            self._done[run.execution_id] = run
            self._trim_done()

    def _adopted_output(
        self,
        run: _Run,
        control: wire.ControlLine,
        trailer: wire.Trailer,
        over: anyio.Event,
        stream: int,
        data: bytes,
    ) -> None:
        """One piece of an adopted container's output, split as ``_pump`` splits it;
        ``over`` is set once it passes the output limit."""
        if stream == 1:
            if not control.done:
                data = control.feed(data)
            if run.artifacts is not None:
                data = run.artifacts.feed(data)
        else:
            data = trailer.feed(data)
        if data and run.verdict is None and not self._capture(run, stream, data):
            over.set()

    async def _sweep_orphans(self, orphans: set[str]) -> None:
        """Once the adoption window has passed, remove what no ``resume`` took."""
        await asyncio.sleep(self._adoption_window)
        for execution_id in orphans - set(self._runs) - set(self._done):
            try:
                await self._sweep_execution(execution_id)
            except BackendError as exc:
                log.warning("could not sweep the leftovers of %s: %s", execution_id, exc.message)

    async def _sweep_execution(self, execution_id: str) -> None:
        """Remove every container and volume of ``execution_id``: labelled with it, or a
        pooled sandbox named for it."""
        await self._engine.sweep({LABEL_EXECUTION: execution_id})
        await self._engine.sweep(
            {LABEL_POOL: "1"}, spare=lambda item: served_execution(item) != execution_id
        )

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
        if run.artifacts is not None:
            outcome = await self._with_artifacts(run, run.artifacts, outcome)
        return outcome

    async def _with_artifacts(
        self, run: _Run, stream: ArtifactStream, outcome: RunOutcome
    ) -> RunOutcome:
        """``outcome`` with the artifacts the bootstrap sent after the program, checked."""
        run.artifacts = None
        config = run.request.config
        try:
            got = await to_thread.run_sync(
                stream.collected, run.request.artifacts, config.max_artifact_bytes
            )
        finally:
            stream.close()
        return attrs.evolve(
            outcome,
            artifacts=got.files,
            artifacts_truncated=got.truncated or stream.overflow,
            artifact_blob=got.blob,
        )

    async def _drive_phases(
        self,
        run: _Run,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        launched: asyncio.Event,
    ) -> RunOutcome:
        lease = None
        try:
            if run.request.requirements_txt.strip():
                lease = await self._deps(run)
            phases = plan(run.request, self._settings)
            if len(phases) > 1:
                # Registered from the worker thread: a cancellation that lands while
                # the engine creates it cannot make the run forget it.
                await self._engine.create_volume(
                    volume_args(run.request, run.execution_id, self._owner),
                    on_created=partial(setattr, run, "volume"),
                )
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
            if launched.is_set() and run.launch_error is None:
                self._dispose(run, lease)  # the outcome does not wait for the removal
            else:  # a launch that fails leaves nothing behind when ``start`` raises
                with anyio.CancelScope(shield=True):
                    await self._release(run)
                if lease is not None:
                    lease.release()
            if self.pool is not None:
                self.pool.wake()
            launched.set()
            self._runs.pop(run.execution_id, None)
            if run.launch_error is None:
                self._done[run.execution_id] = run
                self._trim_done()

    async def _deps(self, run: _Run) -> Lease | None:
        """Serve the run's requirements from the dependency cache when it can: the run
        then installs nothing and gets the environment on its path (every run container
        mounts the finished environments read-only). ``None`` when the run
        installs them itself (no cache, or a build that failed while setup has the network);
        ``_Ended`` (``setup_failed``) when they cannot be had at all."""
        if self.deps is None:
            run.deps_cache = "off"
            return None
        try:
            prepared = await self.deps.prepare(run.request)
        except BuildFailed as exc:
            run.deps_cache = "miss"
            if exc.output:
                run.stderr.feed(exc.output.encode("utf-8", "replace"))
            raise _Ended(run.outcome(Reason.SETUP_FAILED, exc.message)) from None
        run.deps_cache = prepared.status
        if prepared.lease is not None:
            run.deps_key = prepared.lease.digest
            run.request = attrs.evolve(run.request, requirements_txt="")
        return prepared.lease

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
        nonce = new_nonce() if phase.run and request.artifacts else ""
        args = container_args(
            self._settings, request, run.execution_id, phase, run.volume, self._owner, nonce
        )
        sandbox = await self._take_pooled(run, phase, args, nonce)
        if sandbox is not None and nonce:
            nonce = sandbox.nonce  # the one in its label
        if nonce:
            run.artifacts = ArtifactStream(
                nonce, request.config.max_artifact_bytes + blob_overhead()
            )
        spec = wire.spec_frame(
            bootstrap_spec(self._settings, request, phase, deps=run.deps_key, nonce=nonce)
        )
        if sandbox is not None:
            container = sandbox.container
            run.containers.append(container)
        else:
            container = await self._engine.create(args, on_created=run.containers.append)
        if run.killed:
            if sandbox is not None:
                sandbox.conn.close()
            raise _Ended(run.outcome(Reason.KILLED))
        if sandbox is not None:
            conn = sandbox.conn
        else:
            conn = await self._engine.attach(container)
        control = wire.ControlLine()
        trailer = wire.Trailer()
        try:
            if sandbox is None:  # (a pooled sandbox is running already)
                await self._start(run, container)
            await self._drop_keeper(run)
            budget = float(request.config.timeout_seconds)
            if phase.setup:
                deadline = anyio.current_time() + budget + _SETUP_GRACE
            else:
                await self._begin(run, on_running)
                deadline = anyio.current_time() + budget + artifact_grace(request)
            stdin = request.stdin.encode() if phase.run else None
            async with anyio.create_task_group() as group:
                group.start_soon(
                    self._feed, conn, spec, tar if phase.extract else None, stdin, launched
                )
                deadline = await self._pump(
                    run, conn, control, trailer, phase, on_running, deadline
                )
                group.cancel_scope.cancel()
            setup_done = control.status == "setup_ok" and not phase.run
            if setup_done and run.verdict is None and not run.killed:
                run.keeper = (container, conn)
                return
        except BaseException:
            conn.close()
            raise
        conn.close()
        if run.verdict is not None:
            await self._engine.kill(container)
        exited = await self._wait_exit(run, container, phase, control, trailer, deadline)
        run.finished_at = utcnow()
        # A setup step killed for memory makes the bootstrap report setup_failed.
        oom = (
            run.verdict is None
            and (exited == 137 or control.status == "setup_failed")
            and await self._engine.oom_killed(container)
        )
        # Over (``_Ended``): the container is removed after the outcome is handed over.
        self._judge(run, phase, control, trailer, exited, oom)
        await self._discard(run, container)

    async def _take_pooled(
        self, run: _Run, phase: Phase, args: dict[str, Any], nonce: str
    ) -> Sandbox | None:
        """A pooled sandbox made with ``args`` (already started, waiting for its input),
        if the pool has one, one that imported the run's prewarmed environment first if
        there is; only a container that unpacks and runs without a setup can be pooled."""
        if self.pool is None or not phase.run:
            return None
        if phase.setup or not phase.extract:
            self.pool.observer.miss(str(args["image"]), "unpooled")
            return None
        preload = self._preloads.get(run.deps_key or "")
        if preload is None:
            return await self.pool.take(args, run.execution_id)
        warm = container_args(
            self._settings,
            run.request,
            run.execution_id,
            phase,
            run.volume,
            self._owner,
            nonce,
            preload=preload[0],
        )
        return await self.pool.take(warm, run.execution_id, args)

    async def _prewarmed(self, image: str, key: EnvKey) -> None:
        """A prewarmed environment is ready: keep sandboxes of ``image`` (if pooled) that
        import its modules ahead (``PYEXEC_DEPS_POOL_SIZE``), and keep it from eviction
        while they are kept."""
        if self.pool is None or self.deps is None or image not in self._settings.pooled_images:
            return
        digest = key.digest
        if digest not in self._preloads:
            site = self.deps.cache.dir.site(digest)
            modules = await to_thread.run_sync(preload_modules, site, key.requirements)
            if not modules:
                return
            lease = await self.deps.cache.lease(key, counted=False)
            if self._closed:  # shut down meanwhile: its leases are released already
                lease.release()
                return
            self._preloads[digest] = (Preload(deps_path(digest), modules), lease)
        request = parse_request({"docker_image": image}, self._settings)
        shape = self.pool.keep(request, self._settings.deps_pool_size, self._preloads[digest][0])
        self.preloaded[image, " ".join(key.requirements)] = shape

    async def _start(self, run: _Run, container: str) -> None:
        """Start the container; if the run was killed meanwhile, stop it at once (a kill
        that came while it was being attached or started found nothing to stop)."""
        await self._engine.start(container)
        if run.killed:
            await self._engine.kill(container)

    async def _drop_keeper(self, run: _Run) -> None:
        """End the idle setup container once the run container holds the volume."""
        if run.keeper is not None:
            container, conn = run.keeper
            run.keeper = None
            conn.close()
            await self._discard(run, container)

    def _judge(
        self,
        run: _Run,
        phase: Phase,
        control: wire.ControlLine,
        trailer: wire.Trailer,
        exited: int | None,
        oom: bool,
    ) -> None:
        """Raise ``_Ended`` with the outcome, unless a successful setup-only phase ended."""
        ending = Ending(
            phase=phase,
            status=control.status,
            message=control.message,
            exited=exited,
            limit=run.verdict,
            limit_error=run.error,
            killed=run.killed,
            oom=oom,
            memory_mb=run.request.config.memory_mb,
            ended=trailer.kind,
            timeout_seconds=run.request.config.timeout_seconds,
        )
        decided = verdict(ending)
        if decided is None:
            return
        run.exit_code = exited
        raise _Ended(run.outcome(*decided))

    async def _begin(self, run: _Run, on_running: OnRunning) -> None:
        run.started_at = utcnow()
        await on_running(run.started_at)

    async def _feed(
        self,
        conn: AttachSocket,
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

    async def _send_archive(self, conn: AttachSocket, tar: AsyncIterator[bytes]) -> None:
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

        await to_thread.run_sync(work, limiter=self._archive_threads)

    async def _pump(
        self,
        run: _Run,
        conn: AttachSocket,
        control: wire.ControlLine,
        trailer: wire.Trailer,
        phase: Phase,
        on_running: OnRunning,
        deadline: float,
    ) -> float:
        """Read output until the stream ends, a stream overflows or the deadline passes;
        returns the deadline then in force (the run's, once a setup gave way to it)."""
        demux = Demux()
        with anyio.CancelScope(deadline=deadline) as scope:
            while data := await conn.recv():
                for stream, payload in demux.feed(data):
                    if stream == 1 and not control.done:
                        payload = control.feed(payload)
                        if control.status == "ready" and phase.setup:
                            await self._begin(run, on_running)
                            scope.deadline = (
                                anyio.current_time()
                                + run.request.config.timeout_seconds
                                + artifact_grace(run.request)
                            )
                        elif control.status == "setup_ok" and not phase.run:
                            # (In a phase that runs the program, "setup_ok" can only be
                            # a pre_command writing to the bootstrap's stdout: not trusted.)
                            return scope.deadline
                    if stream == 1 and run.artifacts is not None:
                        payload = run.artifacts.feed(payload)
                    if stream == 2:
                        payload = trailer.feed(payload)
                    if stream not in (1, 2) or not payload:
                        continue
                    if run.verdict is not None:
                        continue  # past the output limit, the artifacts are still to come
                    if not self._capture(run, stream, payload) and not (
                        await self._collect_after_limit(run, phase, scope)
                    ):
                        return scope.deadline
            # The stream ended: what the trailer held back was the program's, unless a trailer.
            self._capture(run, 2, trailer.finish())
            if run.artifacts is not None:
                self._capture(run, 1, run.artifacts.finish())
        if scope.cancelled_caught and run.verdict is None:
            self._timed_out(run, phase, control)
        return scope.deadline

    async def _collect_after_limit(self, run: _Run, phase: Phase, scope: anyio.CancelScope) -> bool:
        """Past the output limit, when the request asks for artifacts: have the bootstrap
        end the program and send them (a stop: SIGTERM, which init hands to it), and keep
        reading, dropping output, until it has or the artifacts' grace is over. ``False``
        when there is nothing to wait for (the caller ends the container at once)."""
        if run.artifacts is None or not phase.run or not run.containers:
            return False
        await self._engine.kill(run.containers[-1], signal="SIGTERM")
        scope.deadline = min(scope.deadline, anyio.current_time() + artifact_grace(run.request))
        return True

    def _capture(self, run: _Run, stream: int, payload: bytes) -> bool:
        """Keep output of ``stream``; ``False`` (and the verdict set) once it overflows."""
        capture = run.stdout if stream == 1 else run.stderr
        which = "stdout" if stream == 1 else "stderr"
        kept = len(capture.data)
        fits = capture.feed(payload)
        if run.on_output is not None and len(capture.data) > kept:
            run.on_output(which, bytes(capture.data[kept:]))
        if fits:
            return True
        run.verdict = Reason.OUTPUT_LIMIT
        run.error = f"{which} exceeded {capture.limit} bytes"
        return False

    def _timed_out(self, run: _Run, phase: Phase, control: wire.ControlLine) -> None:
        timeout = run.request.config.timeout_seconds
        run.verdict = Reason.TIMEOUT
        if phase.setup and control.status not in {"ready", "setup_ok"}:
            run.error = f"setup did not finish within {timeout}s"
        else:
            run.error = f"the run exceeded its timeout of {timeout}s"

    async def _wait_exit(
        self,
        run: _Run,
        container: str,
        phase: Phase,
        control: wire.ControlLine,
        trailer: wire.Trailer,
        deadline: float,
    ) -> int | None:
        """The container's exit code, once it exits; a container that closed its output
        but keeps running is stopped when its time is up.

        When the bootstrap's trailer gave the program's exit code, the container exits
        with it (the bootstrap exits with that code, and so does init): no engine call
        is needed, except for 137, where only the engine can tell memory from a kill.
        """
        code = trailer.code
        if run.verdict is None and trailer.kind == "exit" and code is not None and code != 137:
            return code
        if run.verdict is None:
            # Its output ended, so it has normally exited already and this returns at once.
            remaining = max(deadline - anyio.current_time(), 1.0)
            code = await self._engine.wait(container, remaining)
            if code is not None:
                return code
            self._timed_out(run, phase, control)
            await self._engine.kill(container)
        return await self._engine.wait(container, _KILL_WAIT)

    async def _discard(self, run: _Run, container: str) -> None:
        """Remove a container the run is done with. If the engine refuses, the verdict
        stands: the container stays listed for ``_release``, then for a ``kill`` (which
        sweeps by label) or the next ``startup``."""
        try:
            await self._engine.remove_container(container)
        except BackendError as exc:
            log.warning("could not remove container %s: %s", container, exc.message)
            return
        if container in run.containers:
            run.containers.remove(container)

    def _dispose(self, run: _Run, lease: Lease | None) -> None:
        """Remove what a finished run still holds in the background (tracked: ``aclose``
        waits for it, ``_make_room`` bounds how many are under way); its lease on the
        dependency cache is released once its containers are gone."""

        async def dispose() -> None:
            try:
                await self._release(run)
            finally:
                if lease is not None:
                    lease.release()

        task = asyncio.create_task(dispose())
        self._removals[run.execution_id] = task
        task.add_done_callback(lambda _: self._forget_removal(run.execution_id, task))

    def _forget_removal(self, execution_id: str, task: asyncio.Task[None]) -> None:
        if self._removals.get(execution_id) is task:
            del self._removals[execution_id]

    async def _make_room(self) -> None:
        """Wait (bounded) until fewer than ``pending_removals`` finished runs' containers
        are being removed: a slow engine slows new runs down rather than piling up
        containers."""
        with anyio.move_on_after(_KILL_WAIT):
            while len(self._removals) >= self._pending_removals:
                await asyncio.wait(
                    set(self._removals.values()), return_when=asyncio.FIRST_COMPLETED
                )
        if len(self._removals) >= self._pending_removals:
            raise BackendUnavailable(
                "Docker is too slow removing finished runs' containers; retry later",
                code="runner_unavailable",
            )

    async def removed(self, execution_id: str, timeout: float = _KILL_WAIT) -> None:
        """Until the containers and volume of ``execution_id``'s finished run are removed
        (they go in the background once its outcome is known), at most ``timeout``."""
        task = self._removals.get(execution_id)
        if task is not None:
            await asyncio.wait({task}, timeout=timeout)

    async def _release(self, run: _Run) -> None:
        """Remove whatever the run still holds; safe to repeat, never raises a
        ``BackendError`` (what the engine refuses to remove is logged and left)."""
        await self._drop_keeper(run)
        for container in list(run.containers):
            await self._discard(run, container)
        if run.volume is not None and not run.containers:
            try:
                await self._engine.remove_volume(run.volume)
            except BackendError as exc:
                log.warning("could not remove volume %s: %s", run.volume, exc.message)
                return
            run.volume = None

    def _trim_done(self) -> None:
        """Keep at most ``_DONE_KEPT`` finished runs, and of those already collected,
        no more output than ``_COLLECTED_OUTPUT_KEPT`` (newest first)."""
        while len(self._done) > _DONE_KEPT:
            self._done.popitem(last=False)
        kept = 0
        for execution_id, run in reversed(list(self._done.items())):
            if not run.collected or run.task is None or run.task.cancelled():
                continue
            outcome = run.task.result()
            kept += len(outcome.stdout) + len(outcome.stderr)
            if kept > _COLLECTED_OUTPUT_KEPT:
                del self._done[execution_id]

    def _find(self, execution_id: str) -> _Run | None:
        return self._runs.get(execution_id) or self._done.get(execution_id)


def _execution_of(item: dict[str, Any]) -> str | None:
    """The execution a container (as the engine lists it) belongs to, if any."""
    labels = item.get("Labels") or {}
    return labels.get(LABEL_EXECUTION) or served_execution(item)


def _unwrap(exc: Exception) -> Exception:
    """The one error inside (nested) task-group exception groups, if there is just one."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _engine_time(value: str | None) -> datetime | None:
    """A timestamp as the engine gives it (RFC 3339, nanoseconds); ``None`` if unset."""
    if not value or value.startswith("0001-"):
        return None
    head, _, fraction = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00")
