"""The execution service: owns an execution's lifecycle between the store and the runner.

HTTP handlers call this and nothing else; it knows the store and runner only
through their interfaces (``pyexec.store.Store``, ``pyexec.runner.Runner``).

Lifecycle of one execution::

    submit ── validate tar ── store.create (pending) ──┬── answer (async: 202 here)
                                                       │
       background task: runner.start ── on_running → running (tar freed in the store)
                        runner.wait ── store.transition (terminal, CAS)

The tar is stored only for a runner that fetches it from the store (Nomad); the
local runner gets it from a private spool file, so it never goes into Consul. A
launch that fails lands on the record as ``failed`` (a sync caller also gets the
error). The background task counts against the in-flight cap until it ends.

A kill marks the record ``killed`` first (CAS), then stops the run, so a run that
dies from the kill can never be recorded as an ordinary failure.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any, BinaryIO

import attrs
from anyio import to_thread

from . import idempotency
from .artifacts import INLINE_ARTIFACT_BYTES
from .deadline import budget_seconds, execution_budget
from .errors import (
    BackendError,
    BackendUnavailable,
    IdempotentReplay,
    NotFound,
    PayloadTooLarge,
    PyexecError,
    TooManyExecutions,
    TransitionRefused,
)
from .evaluate.outcome import finish_outcome, hide_report, is_eval_request
from .events import EventHub, Subscription
from .logs import bind_execution
from .models import (
    Artifact,
    Execution,
    ExecutionRequest,
    IdempotencyKey,
    Reason,
    RunOutcome,
    Status,
    new_execution_id,
    utcnow,
)
from .runner import OnOutput, Runner
from .settings import Settings
from .store import CHUNK_SIZE, Store
from .tarsafe import validate_tar

__all__ = ["Admission", "ExecutionService", "Postprocess"]


log = logging.getLogger("pyexec.execution_service")

#: Maps a runner's outcome before it is stored (the eval API strips its result channel).
Postprocess = Callable[[RunOutcome], RunOutcome]

ACTIVE = frozenset({Status.PENDING, Status.RUNNING})

#: Tars up to this size are checked on the event loop and spooled in memory.
INLINE_TAR_BYTES = 256 * 1024
#: Pauses between attempts to store an execution's end while the store is unreachable
#: (then the last one, until it lands).
FINAL_WRITE_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)
#: Extra time past a run's deadline before the reconciler of any replica takes it on.
RECONCILE_MARGIN = 30.0
#: How long the reconciler lets the runner report a run it still sees, past its deadline.
RECONCILE_WAIT = 30.0
#: Longest a client may long-poll one GET.
MAX_POLL_SECONDS = 60.0


@attrs.define
class Hooks:
    """Observers the operational layer (metrics, logs) attaches; all optional."""

    on_finished: Callable[[Execution], None] | None = None
    on_started: Callable[[Execution], None] | None = None


class Admission:
    """One in-flight slot taken by ``ExecutionService.admit``; ``release`` is idempotent."""

    def __init__(self, on_release: Callable[[], None]) -> None:
        self._on_release: Callable[[], None] | None = on_release

    def release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()


class ExecutionService:
    def __init__(self, settings: Settings, store: Store, runner: Runner) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.hooks = Hooks()
        self._tasks: dict[str, asyncio.Task[Execution]] = {}
        self._janitor: asyncio.Task[None] | None = None
        self._preparing: asyncio.Task[None] | None = None
        self._admitting = 0
        self._rechecks: set[asyncio.Task[None]] = set()
        self._closing = False
        #: Sync runs waiting on their task, by id: set when the end could not be stored.
        self._stalls: dict[str, asyncio.Event] = {}
        #: Live output: logs of the runs this replica drives, feeds of event streams.
        self.events = EventHub(settings, store)

    # --- lifecycle of the service ----------------------------------------------------------
    async def startup(self) -> None:
        """Prepare the runner and adopt runs left by a previous instance.

        A backend that is down at start-up does not stop the service: it starts, reports
        the backend in /health, and keeps retrying (with backoff) in the background.
        """
        try:
            await self._prepare()
        except BackendError as exc:
            log.warning("start-up deferred, retrying in the background: %s", exc.message)
            self._preparing = asyncio.create_task(self._prepare_until_done(), name="pyexec-prepare")
        self._janitor = asyncio.create_task(self._janitor_loop(), name="pyexec-janitor")

    async def _prepare(self) -> None:
        await self.runner.startup()
        for record in await self.store.list_active():
            await self._adopt(record)

    async def _prepare_until_done(self) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self._prepare()
            except BackendError as exc:
                delay = min(delay * 2, 30.0)
                log.warning("start-up still deferred (next try in %.0f s): %s", delay, exc.message)
            else:
                log.info("start-up completed")
                return

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop the janitor; give local runs ``grace`` seconds, then kill and record them."""
        self._closing = True
        self.events.close()  # event streams end; their clients reconnect elsewhere
        background = [t for t in (self._janitor, self._preparing, *self._rechecks) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending and grace:
            await asyncio.wait(pending, timeout=grace)
        if not self.runner.survives_restart:
            for execution_id in [i for i, t in self._tasks.items() if not t.done()]:
                await self._quietly(
                    self._kill(execution_id, error="the service shut down while it ran")
                )
        remaining = [t for t in self._tasks.values() if not t.done()]
        for drive in remaining:
            drive.cancel()
        await asyncio.gather(*remaining, return_exceptions=True)

    # --- the API --------------------------------------------------------------------------------
    async def submit(
        self,
        request: ExecutionRequest,
        tar: BinaryIO,
        *,
        initial: Mapping[str, Any] | None = None,
        postprocess: Postprocess | None = None,
        idempotency_key: str | None = None,
        admission: Admission | None = None,
    ) -> Execution:
        """Store an execution and return its record as soon as it is stored (pending).

        The launch follows in the background; if it fails, the record says ``failed``
        with the reason. ``tar`` is not needed after this returns. With
        ``idempotency_key``, a key already used for the same request returns that
        execution instead (launched by whoever stored it); for another request, 409.
        ``admission`` is the in-flight slot the caller took with ``admit`` before it read
        the request (the HTTP handlers do, so a refused upload is never read); without
        one, a slot is taken here.
        """
        record, _ = await self._admit(
            request, tar, initial, postprocess, idempotency_key, admission
        )
        return record

    async def run(
        self,
        request: ExecutionRequest,
        tar: BinaryIO,
        *,
        initial: Mapping[str, Any] | None = None,
        postprocess: Postprocess | None = None,
        idempotency_key: str | None = None,
        admission: Admission | None = None,
    ) -> Execution:
        """Submit and wait until the execution is terminal (the sync API); a launch that
        fails raises its error (after recording it). ``admission`` as for ``submit``.

        Every error raised once the execution has an id carries it (``execution_id`` in
        the details), so the caller can read the result later: in particular a run that
        ended while the store was unreachable answers 503 ``store_unavailable`` with the
        id at once, while this replica keeps retrying to store the outcome.
        """
        record, task = await self._admit(
            request, tar, initial, postprocess, idempotency_key, admission
        )
        execution_id = record.execution_id
        if task is None:  # an idempotent replay: whoever stored it runs it
            return await self.store.wait_terminal(execution_id, self._budget(request))
        stalled = self._stalls.setdefault(execution_id, asyncio.Event())
        stall = asyncio.create_task(stalled.wait(), name=f"pyexec-stall-{execution_id}")
        try:
            # Not cancelled with the caller: the task goes on if the client goes away.
            await asyncio.wait({task, stall}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stall.cancel()
            self._stalls.pop(execution_id, None)
        if not task.done():
            raise BackendUnavailable(
                f"execution {execution_id} ended but the store is unreachable; its outcome "
                f"is kept and retried: read it with GET /api/v1/executions/{execution_id}",
                code="store_unavailable",
                execution_id=execution_id,
            )
        try:
            return task.result()
        except asyncio.CancelledError:
            if not self._closing:
                raise
            raise BackendUnavailable(
                f"the service is shutting down; execution {execution_id} goes on: "
                f"read it with GET /api/v1/executions/{execution_id}",
                code="shutting_down",
                execution_id=execution_id,
            ) from None
        except PyexecError as exc:
            exc.details.setdefault("execution_id", execution_id)
            raise

    async def _admit(
        self,
        request: ExecutionRequest,
        tar: BinaryIO,
        initial: Mapping[str, Any] | None,
        postprocess: Postprocess | None,
        idempotency_key: str | None,
        admission: Admission | None,
    ) -> tuple[Execution, asyncio.Task[Execution] | None]:
        """Check, store and hand the execution to a background task that launches and
        follows it; the task counts against the in-flight cap from here on (and the
        admission slot is released). An idempotent replay returns the stored execution
        and no task."""
        admission = admission or self.admit()
        try:
            self.runner.check(request)
            # All the work on the tar's bytes in one go: on the event loop for a small tar
            # (a trip to a worker thread costs more than checking it), else in a thread.
            if _size(tar) <= INLINE_TAR_BYTES:
                claim, spool = self._take_tar(tar, request, idempotency_key)
            else:
                claim, spool = await to_thread.run_sync(
                    self._take_tar, tar, request, idempotency_key
                )
            record = Execution(execution_id=new_execution_id(), request=request, idempotency=claim)
            if initial:
                record = attrs.evolve(record, **initial)
            with bind_execution(record.execution_id):
                try:
                    await self._store_new(record, tar, spool)
                except IdempotentReplay as replay:
                    if claim is None or replay.fingerprint != claim.fingerprint:
                        raise idempotency.refuse_reuse(replay.execution_id) from None
                    return await self.store.get(replay.execution_id), None
                except BackendError as exc:
                    # The write may have landed although its answer was lost: name the id.
                    exc.details.setdefault("execution_id", record.execution_id)
                    raise
                task = self._spawn(
                    record.execution_id, self._execute(record, request, spool, postprocess)
                )
        finally:
            admission.release()
        return record, task

    def admit(self) -> Admission:
        """Take one of this replica's in-flight slots, or refuse at once (429, or 503 while
        shutting down): call it before reading an upload, so a refusal costs nothing."""
        if self._closing:
            raise BackendUnavailable("the service is shutting down", code="shutting_down")
        cap = self.settings.max_in_flight
        in_flight = len(self._tasks) + self._admitting
        if cap and in_flight >= cap:
            raise TooManyExecutions(
                f"this server already runs {in_flight} executions (its cap is {cap}); retry later",
                in_flight=in_flight,
            )
        # Counted from admission, so concurrent submits cannot overshoot the cap.
        self._admitting += 1
        return Admission(self._admitted)

    def _admitted(self) -> None:
        self._admitting -= 1

    def _take_tar(
        self, tar: BinaryIO, request: ExecutionRequest, idempotency_key: str | None
    ) -> tuple[IdempotencyKey | None, BinaryIO | None]:
        """Check the tar, bind the idempotency key to it, and copy it to a private spool
        when the runner does not read it from the store (the launch reads that copy
        after the request that brought the tar is over). Blocking."""
        self._check_tar(tar, request.entrypoint)
        claim = None
        if idempotency_key is not None:
            claim = idempotency.bind(idempotency_key, request, tar)
        return claim, None if self.runner.reads_stored_tar else _spool(tar)

    async def _store_new(self, record: Execution, tar: BinaryIO, spool: BinaryIO | None) -> None:
        """Store ``record``, with its tar only if there is no spool (the runner fetches it
        from the store); the spool is closed if storing fails."""
        try:
            await self.store.create(record, tar if spool is None else None)
        except BaseException:
            if spool is not None:
                spool.close()
            raise

    async def _execute(
        self,
        record: Execution,
        request: ExecutionRequest,
        spool: BinaryIO | None,
        postprocess: Postprocess | None,
    ) -> Execution:
        """Launch a stored execution, then follow it to its end."""
        execution_id = record.execution_id
        tar = self.store.open_tar(execution_id) if spool is None else _chunks(spool)
        # Live output, until the task ends (``_task_done`` releases it).
        on_output = self._live_output(execution_id, request)
        try:
            await self.runner.start(
                record, request, tar, self._on_running(execution_id), on_output=on_output
            )
        except PyexecError as exc:
            # Nothing runs: record why, so the execution never sits in pending forever.
            await self._store_final(
                execution_id, RunOutcome(reason=Reason.ERROR, error=exc.message)
            )
            raise
        finally:
            if spool is not None:
                spool.close()
        return await self._drive(execution_id, self._budget(request), postprocess)

    def _check_tar(self, tar: BinaryIO, entrypoint: str) -> None:
        size = tar.seek(0, os.SEEK_END)
        tar.seek(0)
        if size > self.settings.max_tar_bytes:
            raise PayloadTooLarge(
                f"the tar is {size} bytes; this server takes at most {self.settings.max_tar_bytes}",
                code="tar_too_large",
            )
        validate_tar(
            tar,
            entrypoint=entrypoint,
            max_entries=self.settings.max_tar_entries,
            max_bytes=self.settings.max_extracted_bytes,
        )
        tar.seek(0)

    async def get(self, execution_id: str, *, wait: float = 0) -> Execution:
        wait = min(max(wait, 0.0), MAX_POLL_SECONDS)
        if wait:
            return await self.store.wait_terminal(execution_id, wait)
        return await self.store.get(execution_id)

    async def logs(self, execution_id: str) -> tuple[Execution, str, str]:
        record = await self.get(execution_id)
        if record.terminal:
            return record, record.stdout, record.stderr
        stdout, stderr = await self.runner.logs(execution_id)
        return record, stdout, stderr

    async def kill(self, execution_id: str) -> Execution:
        """Kill a pending or running execution; a finished one is returned unchanged.

        Killing a ``killed`` execution again asks the runner again (idempotent there), so a
        kill whose runner call failed can simply be retried.
        """
        record = await self.get(execution_id)
        if record.status is Status.KILLED:
            await self.runner.kill(execution_id)
        if record.terminal:
            return record
        return await self._kill(execution_id)

    async def subscribe(self, execution_id: str, position: dict[str, int]) -> Subscription:
        """The events of an execution from ``position`` (``pyexec.events``); ``NotFound``,
        or ``TooManySubscribers`` past the per-execution cap."""
        return await self.events.open(execution_id, position)

    async def health(self) -> dict[str, str]:
        checks = {}
        for name, probe in (("store", self.store.ping), ("runner", self.runner.ping)):
            try:
                await asyncio.wait_for(probe(), timeout=5)
                checks[name] = "ok"
            except (PyexecError, TimeoutError) as exc:
                checks[name] = getattr(exc, "message", None) or "timed out"
        return checks

    # --- internals ----------------------------------------------------------------------------
    async def _kill(self, execution_id: str, *, error: str | None = None) -> Execution:
        def kill(record: Execution) -> Execution:
            return record.finished(
                RunOutcome(
                    reason=Reason.KILLED, stdout=record.stdout, stderr=record.stderr, error=error
                )
            )

        try:
            stored = await self.store.transition(execution_id, kill, expect=ACTIVE)
        except TransitionRefused as exc:
            # It finished (or was killed elsewhere) first: that record stands.
            return exc.current
        await self.runner.kill(execution_id)
        self._notify_finished(stored)
        return stored

    def _on_running(self, execution_id: str) -> Callable[[datetime], Awaitable[None]]:
        async def on_running(started_at: datetime) -> None:
            def running(record: Execution) -> Execution:
                return attrs.evolve(record, status=Status.RUNNING, started_at=started_at)

            try:
                stored = await self.store.transition(execution_id, running, expect={Status.PENDING})
            except BackendError as exc:
                # Only a milestone: the final write carries started_at again.
                log.warning("could not record %s as running: %s", execution_id, exc.message)
                return
            except TransitionRefused as exc:
                if exc.current.terminal:
                    # Killed while it launched: the run that just started must stop too.
                    # The kill coroutine is made inside the task: one made here and never
                    # awaited (the task cancelled before it ran) would leak a warning.
                    self._background(self._kill_quietly(execution_id), "kill")
                return
            if self.hooks.on_started:
                self.hooks.on_started(stored)

        return on_running

    def _budget(self, request: ExecutionRequest | None) -> float:
        """How long the service waits for the runner's outcome of ``request``."""
        allowance = self.runner.launch_allowance
        if request is None:  # a record stored without its request: the server's defaults
            return budget_seconds(self.settings.default_timeout, setup=False, allowance=allowance)
        return execution_budget(request, allowance=allowance)

    def _spawn(
        self, execution_id: str, work: Coroutine[Any, Any, Execution]
    ) -> asyncio.Task[Execution]:
        """Run ``work`` (launching and/or following one execution) as this replica's task
        for ``execution_id``; it counts in flight until it ends."""
        # The task copies the context: its log lines carry the execution id.
        with bind_execution(execution_id):
            task = asyncio.create_task(work, name=f"pyexec-drive-{execution_id}")
        self._tasks[execution_id] = task
        task.add_done_callback(functools.partial(self._task_done, execution_id))
        return task

    def _task_done(self, execution_id: str, task: asyncio.Task[Execution]) -> None:
        self._tasks.pop(execution_id, None)
        self.events.release(execution_id)
        if task.cancelled():
            return
        # Retrieved here, so an async run's launch failure (already on its record) is not
        # reported again as "never retrieved"; a sync caller still gets it from the task.
        exc = task.exception()
        if exc is not None and not isinstance(exc, PyexecError):
            log.error("execution task failed", exc_info=exc)

    def _background(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(work, name=f"pyexec-{what}")
        self._rechecks.add(task)
        task.add_done_callback(self._rechecks.discard)

    async def _adopt(self, record: Execution) -> None:
        """After a restart: keep driving what the runner can still see; fail what it lost.

        A pending execution younger than the launch grace may still be on its way (another
        replica between storing and launching it, a bundle awaiting `nomad job dispatch`):
        it is looked at once more when the grace has passed, not failed now.
        """
        if await self._resume(record):
            # An eval run's result channel must be read whichever replica finishes it.
            postprocess = finish_outcome if is_eval_request(record.request) else None
            self._spawn(
                record.execution_id,
                self._drive(record.execution_id, self._budget(record.request), postprocess),
            )
            return
        age = (utcnow() - record.created_at).total_seconds()
        grace = self.settings.launch_grace_seconds
        if record.status is Status.PENDING and age < grace:
            self._background(
                self._adopt_later(record.execution_id, grace - age),
                f"recheck-{record.execution_id}",
            )
            return
        await self._store_final(
            record.execution_id,
            RunOutcome(reason=Reason.ERROR, error="lost: the service restarted while it ran"),
        )

    async def _resume(self, record: Execution) -> bool:
        """``runner.resume``, with the run's live output going to a log again."""
        execution_id = record.execution_id
        on_output = self._live_output(execution_id, record.request)
        resumed = False
        try:
            resumed = await self.runner.resume(record, on_output=on_output)
        finally:
            if not resumed:
                self.events.release(execution_id)
        return resumed

    def _live_output(self, execution_id: str, request: ExecutionRequest | None) -> OnOutput:
        """A new output log for a run this replica drives, as the runner's ``OnOutput``
        (``events.release`` drops it). An eval run's report line is not the user's
        output: live streams never show it."""
        feed = self.events.output_log(execution_id).feed
        return hide_report(feed) if is_eval_request(request) else feed

    async def _adopt_later(self, execution_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            record = await self.store.get(execution_id)
            if record.status is Status.PENDING:
                await self._adopt(record)
        except PyexecError as exc:
            log.warning("re-checking %s after start-up failed: %s", execution_id, exc.message)

    async def _drive(
        self, execution_id: str, budget: float, postprocess: Postprocess | None
    ) -> Execution:
        try:
            outcome = await self.runner.wait(execution_id, budget)
        except TimeoutError:
            await self._quietly(self.runner.kill(execution_id))
            outcome = RunOutcome(
                reason=Reason.TIMEOUT,
                error=f"the runner gave no result within {budget:.0f} s; killed",
            )
        except PyexecError as exc:
            outcome = RunOutcome(reason=Reason.ERROR, error=exc.message)
        if postprocess is not None:
            outcome = postprocess(outcome)
        outcome = await self._keep_artifacts(execution_id, outcome)
        return await self._store_final(execution_id, outcome)

    async def _store_final(self, execution_id: str, outcome: RunOutcome) -> Execution:
        """``_end``, retried with backoff while the store is unreachable, until it lands
        (or another writer ended the execution first). What waits is this execution's
        own task holding one capped outcome, so memory stays bounded by the in-flight
        cap; a sync caller is told at the first failure (``run``)."""
        delays = iter(FINAL_WRITE_BACKOFF)
        while True:
            try:
                return await self._end(execution_id, outcome)
            except BackendUnavailable as exc:
                stalled = self._stalls.get(execution_id)
                if stalled is not None:
                    stalled.set()
                delay = next(delays, FINAL_WRITE_BACKOFF[-1])
                log.warning(
                    "could not store the end of %s (%s); retrying in %.1f s",
                    execution_id,
                    exc.message,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _end(self, execution_id: str, outcome: RunOutcome) -> Execution:
        """Record ``outcome`` as the execution's end, unless it ended already; a run killed
        while it ran keeps its ``killed`` verdict and gets the output (and artifacts) it
        produced."""

        def finish(record: Execution) -> Execution:
            return record.finished(outcome)

        def attach_output(record: Execution) -> Execution:
            if record.stdout or record.stderr:
                return record
            return attrs.evolve(
                record,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                output_truncated=outcome.output_truncated,
                exit_code=outcome.exit_code,
                artifacts=outcome.artifacts,
                artifacts_truncated=outcome.artifacts_truncated,
            )

        try:
            stored = await self.store.transition(execution_id, finish, expect=ACTIVE)
        except TransitionRefused as refused:
            if refused.current.status is not Status.KILLED:
                return refused.current
            try:
                return await self.store.transition(
                    execution_id, attach_output, expect={Status.KILLED}
                )
            except TransitionRefused as exc:
                return exc.current
        self._notify_finished(stored)
        return stored

    async def _keep_artifacts(self, execution_id: str, outcome: RunOutcome) -> RunOutcome:
        """Store the run's artifacts before the record that lists them; if the store
        refuses, the record lists none (``artifacts_truncated``)."""
        blob = outcome.artifact_blob
        if blob is None:
            return outcome
        try:
            await self.store.put_artifacts(execution_id, blob)
        except PyexecError as exc:
            log.warning("could not store the artifacts of %s: %s", execution_id, exc.message)
            return attrs.evolve(outcome, artifacts=(), artifacts_truncated=True, artifact_blob=None)
        finally:
            blob.close()
        return attrs.evolve(outcome, artifact_blob=None)

    async def artifact(self, execution_id: str, path: str) -> tuple[Artifact, AsyncIterator[bytes]]:
        """One artifact of an execution: its entry and its bytes; ``NotFound``
        (``artifact_not_found``) if the record lists no such path."""
        record = await self.get(execution_id)
        for item in record.artifacts:
            if item.path == path:
                return item, self.store.open_artifacts(execution_id, item.offset, item.size)
        raise NotFound(
            f"{execution_id} has no artifact {path[:200]!r}", code="artifact_not_found", path=path
        )

    async def inline_artifacts(self, record: Execution) -> list[dict[str, Any]]:
        """The record's artifacts, each up to ``INLINE_ARTIFACT_BYTES`` with its bytes
        base64-encoded (``content_base64``), for eval's ``inline_artifacts``."""
        listed = []
        for item in record.artifacts:
            entry = item.to_dict()
            if item.size <= INLINE_ARTIFACT_BYTES:
                chunks = self.store.open_artifacts(record.execution_id, item.offset, item.size)
                data = b"".join([chunk async for chunk in chunks])
                entry["content_base64"] = base64.b64encode(data).decode("ascii")
            listed.append(entry)
        return listed

    async def artifacts_tar(self, execution_id: str) -> AsyncIterator[bytes]:
        """Every artifact of an execution as one tar (an empty tar when there are none)."""
        record = await self.get(execution_id)
        if not record.artifacts:
            return _empty_tar()
        return self.store.open_artifacts(execution_id)

    def _notify_finished(self, record: Execution) -> None:
        if self.hooks.on_finished:
            self.hooks.on_finished(record)

    async def _kill_quietly(self, execution_id: str) -> None:
        await self._quietly(self.runner.kill(execution_id))

    async def _quietly(self, call: Awaitable[Any]) -> None:
        try:
            await call
        except PyexecError as exc:
            log.warning("cleanup failed: %s", exc.message)

    async def _janitor_loop(self) -> None:
        interval = max(1.0, min(60.0, self.settings.cleanup_ttl / 2))
        while True:
            await asyncio.sleep(interval)
            await self.reconcile()
            await self.sweep()

    async def reconcile(self) -> int:
        """Finish or fail, once, every unfinished execution past its deadline that no task
        of this replica follows, whoever launched it; safe on every replica at once.

        The deadline is the run's budget (``pyexec.deadline``) plus the launch grace and
        ``RECONCILE_MARGIN`` (room for its own replica to store the end after a store
        outage). A run the runner still sees is followed for ``RECONCILE_WAIT`` seconds
        more (then killed as a timeout); any other is failed as lost. Returns how many
        it took on.
        """
        try:
            active = await self.store.list_active()
        except PyexecError as exc:
            log.warning("reconciler: %s", exc.message)
            return 0
        now, taken = utcnow(), 0
        for record in active:
            execution_id = record.execution_id
            overdue = self._budget(record.request) + self.settings.launch_grace_seconds
            overdue += RECONCILE_MARGIN
            if execution_id in self._tasks or (now - record.created_at).total_seconds() < overdue:
                continue
            taken += 1
            with bind_execution(execution_id):
                try:
                    if await self._resume(record):
                        postprocess = finish_outcome if is_eval_request(record.request) else None
                        self._spawn(
                            execution_id, self._drive(execution_id, RECONCILE_WAIT, postprocess)
                        )
                        continue
                    await self._end(
                        execution_id,
                        RunOutcome(
                            reason=Reason.ERROR,
                            error="lost: not finished within its deadline, and no replica "
                            "was following it",
                        ),
                    )
                except PyexecError as exc:
                    log.warning("reconciler: %s: %s", execution_id, exc.message)
        return taken

    async def sweep(self) -> int:
        """Delete expired executions once; safe to run on every replica at once."""
        try:
            expired = await self.store.list_expired(utcnow(), self.settings.cleanup_ttl)
            for execution_id in expired:
                await self.store.delete(execution_id)
        except PyexecError as exc:
            log.warning("janitor: %s", exc.message)
            return 0
        return len(expired)


def _size(tar: BinaryIO) -> int:
    size = tar.seek(0, os.SEEK_END)
    tar.seek(0)
    return size


def _spool(tar: BinaryIO) -> BinaryIO:
    """A private copy of ``tar``, positioned at 0: in memory when small, else a temporary
    file (gone once closed)."""
    if _size(tar) <= INLINE_TAR_BYTES:
        return io.BytesIO(tar.read())
    spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the launch that reads it
    try:
        shutil.copyfileobj(tar, spool, CHUNK_SIZE)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


async def _empty_tar() -> AsyncIterator[bytes]:
    yield bytes(1024)  # the end-of-archive blocks


async def _chunks(tar: BinaryIO) -> AsyncIterator[bytes]:
    if isinstance(tar, io.BytesIO):  # in memory: no thread needed to read it
        while chunk := tar.read(CHUNK_SIZE):
            yield chunk
        return
    while chunk := await to_thread.run_sync(tar.read, CHUNK_SIZE):
        yield chunk
