"""The Nomad runner: each execution is a dispatch of a parameterized runner job.

``start`` dispatches ``<prefix>-<class>`` (``-pip`` with requirements, ``-setup`` with
pre-commands when ``PYEXEC_SETUP_NETWORK`` gives them the network) with the
execution id in the meta (the tar is already in Consul, where the Nomad client renders
it into the run task) and an idempotency token, then returns. One ``EventWatcher``
follows every run in flight over a single event stream. The run task leaves its capped
output and verdict in the allocation directory; the runner reads them through the
client filesystem API as soon as they are there (it polls for the verdict while the
allocation runs, and reads once more when Nomad reports the run task dead), never
through the logs API and never waiting for the poststop writer. A server-side
clock fails runs that cannot be placed within ``nomad_placement_timeout`` and stops
runs that outlive their timeout (the task enforces it first; this is the backstop);
it also purges a finished run's dispatched job a few minutes after handing over its
outcome, so thousands of dead children do not sit in the servers' state for hours.

Runs outlive the service: after a restart ``resume`` finds the dispatched job of an
execution by its meta and the watcher covers it again. Nothing is dispatched twice.

With a warm pool (``nomad_pool``), ``start`` first tries to claim a slot, an
allocation of the class's pool job already running and waiting for its inputs; a claimed
slot is then followed exactly like a dispatched run (same verdict polling, outcome,
deadlines, kill), only with ``started_at`` never before the claim. A request the pool
cannot serve is dispatched cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from datetime import datetime
from functools import partial
from typing import Any

import attrs
from anyio import to_thread

from pyexec.artifacts import blob_overhead, read_artifacts
from pyexec.deadline import budget_seconds, execution_budget
from pyexec.errors import BackendError, BackendUnavailable, BadRequest, PyexecError
from pyexec.models import Execution, ExecutionRequest, Reason, RunOutcome
from pyexec.runner import OnOutput, OnRunning, nomad_job
from pyexec.runner import nomad_state as state
from pyexec.runner.nomad_http import NomadAPI, NomadError
from pyexec.runner.nomad_pool import Claim, NomadPool
from pyexec.runner.nomad_watch import EventWatcher
from pyexec.settings import Settings
from pyexec.store import Store

__all__ = ["NomadRunner"]

log = logging.getLogger("pyexec.runner.nomad")

JSON = dict[str, Any]
#: How often the deadline clock looks at the runs in flight.
TICK_SECONDS = 1.0
#: Dispatched jobs whose latest events are kept until ``start`` tracks them (a dispatch
#: races its own first events); only a handful are ever in that window at once.
UNCLAIMED_JOBS = 256
#: How long one listing of dispatched jobs answers ``resume``/``kill`` lookups.
LISTING_TTL_SECONDS = 5.0
#: Polling for the run task's verdict while its allocation runs: the pause, for the first
#: seconds (a short run's whole life), then growing by half each time up to the longest.
VERDICT_POLL_SECONDS = (0.05, 1.0)
VERDICT_FAST_POLL_SECONDS = 2.0
#: Longest pause between looks while the run's output is followed live (``on_output``):
#: each look lists the results directory and reads what the output files gained.
LIVE_POLL_SECONDS = 0.25
#: How long a finished run's dispatched job stays before the runner purges it. Every
#: child is a full copy of its runner job (the task script three times, ~80 KB; more
#: with PYEXEC_CA_BUNDLE) held in the servers' memory and snapshots until Nomad's own
#: job GC (4 h by default): thousands of runs an hour would hold gigabytes. The grace
#: lets the service store the record first (a restart before then still adopts it)
#: and leaves a few minutes for `nomad job status`.
PURGE_AFTER_SECONDS = 300.0
#: Largest single read of the artifacts file through the client filesystem API.
ARTIFACT_READ_BYTES = 4 * 1024 * 1024
#: Pauses between dispatch attempts when Nomad is unreachable or leaderless.
DISPATCH_RETRY_DELAYS = (0.2, 1.0)
#: Texts of 500 answers that are Nomad's own trouble, not a bad dispatch.
TRANSIENT_DISPATCH_ERRORS = ("no cluster leader", "rpc error", "eof", "timeout")


def _transient(exc: PyexecError) -> bool:
    """Whether a failed dispatch may pass on a retry (and may also have landed)."""
    return isinstance(exc, BackendUnavailable) or any(
        text in exc.message.lower() for text in TRANSIENT_DISPATCH_ERRORS
    )


def _not_before(outcome: RunOutcome, moment: datetime) -> RunOutcome:
    """``outcome`` with no time earlier than ``moment`` (a pooled run's claim: what Nomad
    reports of the task is the slot's start, long before the run's)."""
    started, finished = outcome.started_at, outcome.finished_at
    return attrs.evolve(
        outcome,
        started_at=None if started is None else max(started, moment),
        finished_at=None if finished is None else max(finished, moment),
    )


@attrs.define
class _Run:
    """One dispatched execution the runner follows."""

    execution_id: str
    job_id: str
    #: Seconds from placement until the server-side deadline stops it (``pyexec.deadline``).
    budget: float
    max_output: int
    on_running: OnRunning | None
    outcome: asyncio.Future[RunOutcome]
    since: float = attrs.field(factory=time.monotonic)
    alloc: JSON | None = None
    placed_at: float | None = None
    placement: str | None = None
    job_stopped: bool = False
    reported_running: bool = False
    concluding: bool = False
    #: Its re-read after a gap in the events failed: the clock retries it.
    stale: bool = False
    #: ``wait`` gave up on it: nobody collects the outcome, so the runner lets go of it
    #: itself once the run is over.
    abandoned: bool = False
    #: Set when the service itself stops the run (deadlines): this verdict wins over
    #: the "stopped" that Nomad then reports.
    expired: RunOutcome | None = None
    #: Polls the allocation directory for the verdict (from placement until concluded).
    poller: asyncio.Task[None] | None = None
    #: Gets the output as the run task writes it (live output), if anybody asked.
    on_output: OnOutput | None = None
    #: What of each output file was handed to ``on_output`` so far (at most the cap), and
    #: from which allocation: the outcome reads only the rest.
    streamed: dict[str, bytearray] = attrs.Factory(
        lambda: {"stdout": bytearray(), "stderr": bytearray()}
    )
    streamed_from: str | None = None
    #: One reader at a time per output file (the poller and a conclusion an event started).
    reading: dict[str, asyncio.Lock] = attrs.Factory(
        lambda: {"stdout": asyncio.Lock(), "stderr": asyncio.Lock()}
    )
    #: The request's artifact patterns and cap (``pyexec.artifacts``), if it asks for any.
    artifacts: tuple[str, ...] = ()
    artifact_cap: int = 0
    #: The warm-pool slot it runs in (``nomad_pool``), if it was not dispatched cold.
    slot: str | None = None
    #: A pooled run starts when it is claimed: no time it reports is earlier.
    not_before: datetime | None = None


class NomadRunner:
    survives_restart = True
    #: The job's setup task fetches the tar from Consul.
    reads_stored_tar = True

    def __init__(
        self,
        settings: Settings,
        api: NomadAPI,
        store: Store | None = None,
        pool: NomadPool | None = None,
        *,
        slots: NomadPool | None = None,
    ) -> None:
        self.settings = settings
        self.api = api
        self.store = store
        #: The warm pool (``nomad_pool``), or ``None``; read by /metrics and /health.
        self.pool = pool
        #: Where claimed slots are looked up and released: the pool, or with the pool
        #: off one that never fills, so a pooled run in flight across a restart that
        #: turned the pool off is still adopted (and leftovers swept).
        self._slots = pool if pool is not None else slots
        self._runs: dict[str, _Run] = {}  # by execution id
        self._by_job: dict[str, _Run] = {}  # by dispatched job id
        self._unclaimed: OrderedDict[str, dict[str, JSON]] = OrderedDict()
        self._children: dict[str, str] = {}  # execution id -> dispatched job id
        self._children_at = -LISTING_TTL_SECONDS
        self._background: set[asyncio.Task[Any]] = set()
        self._watcher = EventWatcher(
            api,
            on_event=self._on_event,
            reconcile=self._reconcile,
            index_prefix=settings.nomad_job_prefix,
        )
        self._clock: asyncio.Task[None] | None = None
        self._purges: deque[tuple[float, str]] = deque()  # (when, dispatched job id)
        self._parents = {
            nomad_job.job_id(settings, c, pip=pip, setup=setup)
            for c in settings.nomad_resource_classes
            for pip, setup in nomad_job.variants(settings)
        }

    @classmethod
    def from_settings(cls, settings: Settings, store: Store | None = None) -> NomadRunner:
        """The runner ``settings`` describe; with a ``store`` (the service's) and pooled
        images, with its warm pool (the CLI's job commands need none)."""
        api = NomadAPI(settings)
        if store is None:
            return cls(settings, api)
        slots = NomadPool.from_settings(settings, api)
        return cls(settings, api, store, slots if settings.pooled_images else None, slots=slots)

    # --- Runner ------------------------------------------------------------------------------
    @property
    def launch_allowance(self) -> float:
        """A dispatched run may wait this long for placement before its budget starts."""
        return self.settings.nomad_placement_timeout

    def check(self, request: ExecutionRequest) -> None:
        """Refuse at submit what the runner jobs cannot honour (never drop it silently).

        Pre-commands are always honoured, as on the local Docker runner: in the run task
        without network, or with ``PYEXEC_SETUP_NETWORK=true`` in a ``setup`` task with
        it; only the checks every request gets apply to them."""
        nomad_job.pick_class(self.settings, request.config)
        if not request.config.network_disabled:
            raise BadRequest(
                "the Nomad runner runs every request without network "
                "(its run task has network_mode none): network_disabled must be true",
                code="network_unavailable",
                field="config.network_disabled",
            )
        for line in request.requirements_txt.splitlines():
            problem = nomad_job.requirement_problem(line)
            if problem is not None:
                raise BadRequest(
                    f"requirements_txt line {line.strip()!r}: {problem} (the Nomad runner "
                    "installs wheels only, from the configured index)",
                    code="requirement_not_wheel",
                    field="requirements_txt",
                )
        if (
            request.requirements_txt.strip()
            and not self.settings.setup_network
            and not self.settings.deps_prewarmed(request.requirements_txt)
        ):
            raise BadRequest(
                "this server gives setup no network, which the requirements installer needs "
                "(pre_commands run without it and are fine)",
                code="setup_network_unavailable",
                field="requirements_txt",
            )
        if request.config.cpu_shares != self.settings.default_cpu_shares:
            raise BadRequest(
                "the Nomad runner's CPU share is its resource class's cpu; config.cpu_shares "
                f"must be left at the default ({self.settings.default_cpu_shares})",
                code="cpu_shares_unsupported",
                field="config.cpu_shares",
            )

    async def startup(self) -> None:
        """Register the runner jobs Nomad lacks (unless turned off), then start watching."""
        if self.settings.nomad_register_jobs:
            await self.register_jobs(overwrite=False)
        self._start_watching()
        if self._slots is not None:
            await self._slots.startup(fill=self._slots is self.pool)
        prewarm = nomad_job.deps_prewarm_job(self.settings)
        if prewarm is not None:
            task = asyncio.create_task(self._prewarm_deps(prewarm), name="pyexec-deps-prewarm")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _prewarm_deps(self, job: JSON) -> None:
        """Register the dependency prewarm job (it is the service's own: always updated)
        and dispatch it once: it runs on every node with the cache volume, in the
        background (start-up is not held up); failures are logged."""
        try:
            await self.api.register_job(job)
            answer = await self.api.dispatch(job["ID"], {}, f"prewarm-{uuid.uuid4().hex}")
        except PyexecError as exc:
            log.warning("dependency prewarm not dispatched: %s", exc.message)
            return
        log.info("dependency prewarm dispatched as %s", answer.get("DispatchedJobID"))

    async def register_jobs(self, *, overwrite: bool = True) -> list[str]:
        """Register every job the service uses (``nomad_job.service_jobs``); with
        ``overwrite=False`` only those Nomad does not have, so what an operator changed in
        a registered job stays as it is."""
        registered = []
        for job in nomad_job.service_jobs(self.settings):
            if not overwrite and await self.api.get_job(job["ID"]) is not None:
                continue
            await self.api.register_job(job)
            registered.append(job["ID"])
        return registered

    def _start_watching(self) -> None:
        self._watcher.start()
        if self._clock is None:
            self._clock = asyncio.create_task(self._deadlines(), name="pyexec-nomad-deadlines")

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        *,
        on_output: OnOutput | None = None,
    ) -> None:
        # The tar is in Consul already; the job's setup task reads it from there.
        self.check(request)
        if self.pool is not None:
            try:
                claim = await self.pool.take(execution.execution_id, request)
            except PyexecError as exc:  # the pool is an optimisation: the cold path stands
                log.warning("warm pool failed for %s: %s", execution.execution_id, exc.message)
                claim = None
            if claim is not None:
                run = self._follow(
                    execution.execution_id, claim.slot.job_id, request, on_running, on_output
                )
                self._claimed(run, claim)
                return
        resource_class = nomad_job.pick_class(self.settings, request.config)
        pip = bool(request.requirements_txt.strip())
        setup = nomad_job.uses_setup_task(self.settings, request.pre_commands)
        parent = nomad_job.job_id(self.settings, resource_class, pip=pip, setup=setup)
        # The service stores the final record itself (after post-processing, e.g. eval).
        meta = {
            "execution_id": execution.execution_id,
            "image": request.docker_image,
            "result_writer": "service",
        }
        try:
            answer = await self._dispatch(parent, meta, execution.execution_id)
        except BackendUnavailable:
            await self._stop_orphan(execution.execution_id)
            raise
        except NomadError as exc:
            if _transient(exc):
                await self._stop_orphan(execution.execution_id)
            hint = ""
            if "not found" in exc.message:
                hint = " (are the runner jobs registered? see `pyexec job register`)"
            raise BackendError(
                f"Nomad refused to dispatch {parent} for {execution.execution_id}: "
                f"{exc.message}{hint}",
                code="nomad_dispatch_failed",
                nomad_status=exc.status,
            ) from None
        self._follow(
            execution.execution_id, answer["DispatchedJobID"], request, on_running, on_output
        )

    def _follow(
        self,
        execution_id: str,
        job_id: str,
        request: ExecutionRequest,
        on_running: OnRunning,
        on_output: OnOutput | None,
    ) -> _Run:
        """Watch a launched run (dispatched, or handed to a pool slot) until its outcome."""
        self._start_watching()
        run = self._track(
            execution_id,
            job_id,
            execution_budget(request),
            request.config.max_output_bytes,
            on_running,
        )
        run.on_output = on_output
        run.artifacts, run.artifact_cap = request.artifacts, request.config.max_artifact_bytes
        return run

    def _claimed(self, run: _Run, claim: Claim) -> None:
        """A run handed to a pool slot: running from the claim, its allocation known."""
        run.slot = claim.slot.slot_id
        run.not_before = claim.claimed_at
        run.placed_at = time.monotonic()
        run.reported_running = True
        if run.on_running is not None:
            self._spawn(run.on_running(claim.claimed_at))
        self._on_alloc(run, claim.alloc)

    async def _dispatch(self, parent: str, meta: dict[str, str], token: str) -> JSON:
        """Dispatch, retrying briefly what may be transient: the idempotency token makes a
        retry of a dispatch that did land return that same job, never a second run."""
        for delay in (*DISPATCH_RETRY_DELAYS, None):
            try:
                return await self.api.dispatch(parent, meta, token)
            except (BackendUnavailable, NomadError) as exc:
                if delay is None or not _transient(exc):
                    raise
                log.warning("dispatch of %s failed (%s); retrying", token, exc.message)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _stop_orphan(self, execution_id: str) -> None:
        """After a dispatch that failed in a way that may have landed (the answer was lost),
        stop the job it may have started: nothing runs for an execution reported failed.
        Best effort: if Nomad cannot be asked, the failure stands as it is."""
        try:
            job_id = await self._find_job(execution_id, recheck=True)
            if job_id is not None:
                log.warning("stopping %s, dispatched for %s before it failed", job_id, execution_id)
                await self.api.stop_job(job_id)
        except PyexecError as exc:
            log.warning("could not look for a job of %s's failed dispatch: %s", execution_id, exc)

    async def wait(self, execution_id: str, timeout: float) -> RunOutcome:
        run = self._runs.get(execution_id)
        if run is None:
            raise BackendError(
                f"the Nomad runner is not following {execution_id}", code="runner_error"
            )
        try:
            outcome = await asyncio.wait_for(asyncio.shield(run.outcome), timeout)
        except TimeoutError:
            run.abandoned = True
            raise
        self._release(run)
        return outcome

    async def logs(self, execution_id: str) -> tuple[str, str]:
        run = self._runs.get(execution_id)
        if run is None:
            return "", ""
        if run.alloc is None:
            return "", f"pyexec: {run.placement}\n" if run.placement else ""
        stdout, stderr, _ = await self._read_output(run.alloc["ID"], run.max_output)
        return stdout, stderr

    async def kill(self, execution_id: str) -> None:
        run = self._runs.get(execution_id)
        # A job another replica dispatched moments ago may be missing from a cached listing.
        job_id = run.job_id if run is not None else await self._find_job(execution_id, recheck=True)
        if job_id is None and self._slots is not None:
            found = await self._slots.find(execution_id)
            job_id = None if found is None else found[1]
        if job_id is not None:
            await self.api.stop_job(job_id)

    async def resume(self, execution: Execution, *, on_output: OnOutput | None = None) -> bool:
        job_id = await self._find_job(execution.execution_id)
        slot: tuple[str, str, datetime] | None = None
        if job_id is None and self._slots is not None:
            slot = await self._slots.find(execution.execution_id)
            job_id = None if slot is None else slot[1]
        if job_id is None:
            return False
        request = execution.request
        self._start_watching()
        run = self._track(
            execution.execution_id,
            job_id,
            budget_seconds(self.settings.default_timeout, setup=False)
            if request is None
            else execution_budget(request),
            self.settings.default_max_output_bytes
            if request is None
            else request.config.max_output_bytes,
            None,
        )
        if request is not None:
            run.artifacts = request.artifacts
            run.artifact_cap = request.config.max_artifact_bytes
        if slot is not None:
            run.slot, run.not_before, run.reported_running = slot[0], slot[2], True
        # From the start of the files: the store skips what the last replica flushed.
        run.on_output = on_output
        await self._refresh(run)
        return True

    async def ping(self) -> None:
        try:
            await self.api.leader()
        except NomadError as exc:
            raise BackendUnavailable(exc.message, code="runner_unavailable") from None

    async def aclose(self) -> None:
        clock, self._clock = self._clock, None
        if clock is not None:
            clock.cancel()
            await asyncio.gather(clock, return_exceptions=True)
        await self._watcher.aclose()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._slots is not None:
            await self._slots.aclose()
        await self.api.aclose()

    # --- following runs ----------------------------------------------------------------------
    def _track(
        self,
        execution_id: str,
        job_id: str,
        budget: float,
        max_output: int,
        on_running: OnRunning | None,
    ) -> _Run:
        run = _Run(
            execution_id=execution_id,
            job_id=job_id,
            budget=budget,
            max_output=max_output,
            on_running=on_running,
            outcome=asyncio.get_running_loop().create_future(),
        )
        self._runs[execution_id] = run
        self._by_job[job_id] = run
        for event in self._unclaimed.pop(job_id, {}).values():
            self._apply(run, event)
        return run

    def _release(self, run: _Run) -> None:
        """Stop following a run whose outcome is settled; purge its job later."""
        self._runs.pop(run.execution_id, None)
        self._by_job.pop(run.job_id, None)
        self._purges.append((time.monotonic() + PURGE_AFTER_SECONDS, run.job_id))
        if run.slot is not None and self._slots is not None:
            self._spawn(self._slots.release(run.slot))

    def _on_event(self, event: JSON) -> None:
        try:
            payload = event.get("Payload") or {}
            body = payload.get(event.get("Topic", ""))
            if not isinstance(body, dict):
                return
            job_id = body.get("JobID") if event.get("Topic") != "Job" else body.get("ID")
            if not isinstance(job_id, str):
                return
            run = self._by_job.get(job_id)
            if run is not None:
                self._apply(run, event)
            elif job_id.split("/", 1)[0] in self._parents and "/" in job_id:
                # Only the latest event per object matters (each carries the whole object).
                # Per object, not per topic: a dispatch's first evaluation (with the
                # placement failure) and the blocked one it creates arrive together.
                key = f"{event.get('Topic')}:{event.get('Key')}"
                self._unclaimed.setdefault(job_id, {})[key] = event
                self._unclaimed.move_to_end(job_id)
                while len(self._unclaimed) > UNCLAIMED_JOBS:
                    self._unclaimed.popitem(last=False)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a Nomad event pyexec cannot read: %r", exc)

    def _apply(self, run: _Run, event: JSON) -> None:
        topic = event.get("Topic")
        payload = event.get("Payload") or {}
        if topic == "Allocation":
            self._on_alloc(run, payload["Allocation"])
        elif topic == "Evaluation":
            self._on_eval(run, payload["Evaluation"])
        elif topic == "Job":
            job = payload.get("Job") or {}
            if event.get("Type") == "JobDeregistered" or job.get("Stop"):
                run.job_stopped = True
                self._maybe_conclude(run)

    def _on_alloc(self, run: _Run, alloc: JSON) -> None:
        held = run.alloc
        if (
            held is not None
            and held.get("ID") == alloc.get("ID")
            and int(alloc.get("ModifyIndex") or 0) < int(held.get("ModifyIndex") or 0)
        ):
            return  # an older view than the one we hold
        run.alloc = alloc
        run.placement = None
        if run.placed_at is None:
            run.placed_at = time.monotonic()
        if run.poller is None and not state.run_over(alloc):
            run.poller = asyncio.create_task(self._poll_verdict(run, alloc["ID"]))
            self._background.add(run.poller)
            run.poller.add_done_callback(self._background.discard)
        started = state.run_started(alloc)
        if started is not None and not run.reported_running:
            run.reported_running = True
            if run.on_running is not None:
                self._spawn(run.on_running(started))
        self._maybe_conclude(run)

    def _on_eval(self, run: _Run, evaluation: JSON) -> None:
        if run.alloc is not None:
            return
        reason = state.placement_failure(evaluation)
        if reason is not None and reason != run.placement:
            run.placement = reason
            log.warning("execution %s %s", run.execution_id, reason)

    def _maybe_conclude(self, run: _Run) -> None:
        if run.concluding or run.outcome.done():
            return
        if run.alloc is not None and state.run_over(run.alloc):
            run.concluding = True
            self._spawn(self._conclude(run))
        elif run.alloc is None and run.job_stopped:
            # Stopped before anything was placed: nothing ran.
            self._resolve(run, RunOutcome(reason=Reason.KILLED, error="stopped before it ran"))

    async def _poll_verdict(self, run: _Run, alloc_id: str) -> None:
        """Conclude as soon as the run task has written its verdict: Nomad reports a task
        dead only on the client's next sync with the servers, often most of a second
        later. One listing per look: every 50 ms for the first 2 s, then pauses grow
        to 1 s, so long runs cost little."""
        pause, longest = VERDICT_POLL_SECONDS
        if run.on_output is not None:
            longest = min(longest, LIVE_POLL_SECONDS)
        fast_until = time.monotonic() + VERDICT_FAST_POLL_SECONDS
        while not (run.concluding or run.outcome.done()):
            await asyncio.sleep(pause)
            if time.monotonic() > fast_until:
                pause = min(longest, pause * 1.5)
            if run.concluding or run.outcome.done() or run.alloc is None:
                return
            if run.alloc["ID"] != alloc_id:
                return
            try:
                files = await self.api.list_files(alloc_id, state.RESULTS_DIR)
            except PyexecError as exc:
                log.debug("results of %s not readable yet: %s", run.execution_id, exc)
                continue
            if files is None:
                continue
            if state.VERDICT_FILE not in files:
                if run.on_output is not None:
                    await self._stream_output(run, alloc_id, files)
                continue
            if not (run.concluding or run.outcome.done()):
                run.concluding = True
                await self._conclude(run, files)
                return

    async def _conclude(self, run: _Run, files: dict[str, int] | None = None) -> None:
        assert run.alloc is not None
        alloc = run.alloc
        try:
            if files is None:
                files = await self.api.list_files(alloc["ID"], state.RESULTS_DIR) or {}
            # The verdict and what the output files hold beyond what was streamed already,
            # read at once: after the program, only these reads stand before the answer.
            size = min(files.get(state.VERDICT_FILE, 0), state.VERDICT_BYTES + 1)
            raw, stdout, stderr = await asyncio.gather(
                self._read(alloc["ID"], state.VERDICT_FILE, size),
                self._output_rest(run, alloc["ID"], "stdout", files),
                self._output_rest(run, alloc["ID"], "stderr", files),
            )
            verdict = state.parse_verdict(raw) if state.VERDICT_FILE in files else None
            truncated = any(files.get(name, 0) > run.max_output for name in ("stdout", "stderr"))
            outcome = state.outcome(
                alloc,
                verdict,
                stdout.decode("utf-8", "replace"),
                stderr.decode("utf-8", "replace"),
                truncated,
            )
        except PyexecError as exc:
            # The run is over but its results cannot be read (e.g. the alloc was collected).
            outcome = state.outcome(alloc, None, "", "", False)
            outcome = attrs.evolve(outcome, error=outcome.error or exc.message)
        if run.artifacts:
            outcome = await self._with_artifacts(run, alloc["ID"], files or {}, outcome)
        self._resolve(run, outcome)

    async def _stream_output(self, run: _Run, alloc_id: str, files: dict[str, int]) -> None:
        """Hand ``on_output`` what the output files gained since the last look (the run
        task writes and flushes them as the program prints, up to the cap). A read that
        fails is retried on the next look; the outcome reads the files whole anyway."""
        assert run.on_output is not None
        for stream in ("stdout", "stderr"):
            try:
                await self._output_rest(run, alloc_id, stream, files)
            except PyexecError as exc:
                log.debug("output of %s not readable yet: %s", run.execution_id, exc)
                return

    async def _output_rest(
        self, run: _Run, alloc_id: str, stream: str, files: dict[str, int]
    ) -> bytes:
        """The output file ``stream`` up to the cap as listed in ``files``: what was
        streamed already plus the rest, read now and handed to ``on_output`` (if any)."""
        async with run.reading[stream]:
            if run.streamed_from != alloc_id:  # (a new allocation's files start empty)
                run.streamed_from = alloc_id
                run.streamed = {"stdout": bytearray(), "stderr": bytearray()}
            kept = run.streamed[stream]
            size = min(files.get(stream, 0), run.max_output)
            if size > len(kept):
                data = await self._read(alloc_id, stream, size - len(kept), offset=len(kept))
                kept += data
                if run.on_output is not None:
                    run.on_output(stream, data)
            return bytes(kept)

    async def _with_artifacts(
        self, run: _Run, alloc_id: str, files: dict[str, int], outcome: RunOutcome
    ) -> RunOutcome:
        """``outcome`` with the artifacts the run task left in the allocation directory,
        read through the client filesystem API and checked (``pyexec.artifacts``)."""
        size = files.get(state.ARTIFACTS_FILE)
        if size is None:  # asked for, none came (the task never got to collect them)
            return attrs.evolve(outcome, artifacts_truncated=True)
        limit = run.artifact_cap + blob_overhead()
        spool = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)  # noqa: SIM115 - closed below
        try:
            for offset in range(0, min(size, limit), ARTIFACT_READ_BYTES):
                length = min(ARTIFACT_READ_BYTES, min(size, limit) - offset)
                spool.write(await self._read(alloc_id, state.ARTIFACTS_FILE, length, offset))
            spool.seek(0)
            check = partial(read_artifacts, truncated=size > limit)
            got = await to_thread.run_sync(check, spool, run.artifacts, run.artifact_cap)
        except PyexecError as exc:
            log.warning("artifacts of %s not readable: %s", run.execution_id, exc.message)
            return attrs.evolve(outcome, artifacts_truncated=True)
        finally:
            spool.close()
        return attrs.evolve(
            outcome,
            artifacts=got.files,
            artifacts_truncated=got.truncated,
            artifact_blob=got.blob,
        )

    async def _read(self, alloc_id: str, name: str, length: int, offset: int = 0) -> bytes:
        if length <= 0:
            return b""
        path = f"{state.RESULTS_DIR}/{name}"
        return await self.api.read_file(alloc_id, path, length, offset=offset)

    async def _read_output(
        self, alloc_id: str, cap: int, files: dict[str, int] | None = None
    ) -> tuple[str, str, bool]:
        """The capped output the run task left (a file longer than the cap is truncated)."""
        if files is None:
            files = await self.api.list_files(alloc_id, state.RESULTS_DIR) or {}
        texts: list[str] = []
        cut = False
        for name in ("stdout", "stderr"):
            size = files.get(name, 0)
            cut = cut or size > cap
            data = await self._read(alloc_id, name, min(size, cap))
            texts.append(data.decode("utf-8", "replace"))
        return texts[0], texts[1], cut

    def _resolve(self, run: _Run, outcome: RunOutcome) -> None:
        if run.outcome.done():
            return
        if run.expired is not None:
            outcome = attrs.evolve(
                run.expired,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                output_truncated=outcome.output_truncated,
                started_at=outcome.started_at,
                finished_at=outcome.finished_at,
            )
        if run.not_before is not None:
            outcome = _not_before(outcome, run.not_before)
        run.outcome.set_result(outcome)
        if self.pool is not None:
            self.pool.wake()  # a slot made while this run ran would have taken its CPU
        if run.abandoned:
            self._release(run)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(self, run: _Run) -> None:
        """Read a run's allocations and evaluations afresh (after a gap in the events)."""
        allocs = await self.api.job_allocations(run.job_id)
        if allocs:
            latest = max(allocs, key=lambda a: int(a.get("CreateIndex") or 0))
            self._on_alloc(run, await self.api.allocation(latest["ID"]))
            return
        job = await self.api.get_job(run.job_id)
        if job is None:  # collected or purged: nothing will change any more
            self._resolve(
                run,
                RunOutcome(
                    reason=Reason.ERROR,
                    error=f"Nomad no longer has the dispatched job {run.job_id}",
                ),
            )
            return
        run.job_stopped = bool(job.get("Stop"))
        for evaluation in await self.api.job_evaluations(run.job_id):
            self._on_eval(run, evaluation)
        self._maybe_conclude(run)

    async def _reconcile(self) -> None:
        for run in list(self._runs.values()):
            if not run.outcome.done():
                await self._refresh_or_mark(run)

    async def _refresh_or_mark(self, run: _Run) -> None:
        """Re-read one run; if Nomad refuses, mark it for the clock to retry. One run Nomad
        answers badly for must not hold up the event stream every other run depends on
        (an unreachable Nomad still raises: the watcher reconnects)."""
        try:
            await self._refresh(run)
        except NomadError as exc:
            run.stale = True
            log.warning("could not re-read %s (will retry): %s", run.job_id, exc.message)
        else:
            run.stale = False

    async def _deadlines(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                await self._tick()
            except Exception:
                # The clock is the backstop of every run: one bad tick must not stop it.
                log.exception("nomad deadline clock: tick failed")

    async def _tick(self) -> None:
        """One look at the runs in flight: retry stale re-reads, enforce deadlines; purge
        finished runs' jobs that are due."""
        now = time.monotonic()
        while self._purges and self._purges[0][0] <= now:
            _, job_id = self._purges.popleft()
            try:
                await self.api.stop_job(job_id, purge=True)
            except PyexecError as exc:  # Nomad's own GC collects it later
                log.warning("could not purge %s: %s", job_id, exc.message)
        for run in list(self._runs.values()):
            if run.outcome.done() or run.concluding:
                continue
            if run.stale:
                with contextlib.suppress(BackendUnavailable):
                    await self._refresh_or_mark(run)
                if run.outcome.done() or run.concluding:
                    continue
            if run.placed_at is None:
                if now - run.since > self.settings.nomad_placement_timeout:
                    why = run.placement or "no allocation was created"
                    await self._expire(
                        run,
                        Reason.ERROR,
                        (f"not placed within {self.settings.nomad_placement_timeout:.0f} s: {why}"),
                    )
                continue
            if now - run.placed_at > run.budget:
                await self._expire(
                    run, Reason.TIMEOUT, f"stopped by the server-side deadline ({run.budget:.0f} s)"
                )

    async def _expire(self, run: _Run, reason: Reason, error: str) -> None:
        run.expired = RunOutcome(reason=reason, error=error)
        try:
            await self.api.stop_job(run.job_id)
        except PyexecError as exc:
            run.expired = None
            log.warning("could not stop %s: %s", run.job_id, exc.message)
            return  # try again on the next tick
        if run.alloc is None:
            self._resolve(run, RunOutcome(reason=reason, error=error))
        # else: the stopped allocation concludes with its output, under this verdict.

    async def _find_job(self, execution_id: str, *, recheck: bool = False) -> str | None:
        """The dispatched job carrying ``execution_id`` in its meta, if Nomad still has it.

        One listing answers every lookup for a few seconds, so a restart that resumes
        many executions lists the jobs once, not once per execution; ``recheck`` lists
        again when the cached listing does not have it.
        """
        fresh = time.monotonic() - self._children_at < LISTING_TTL_SECONDS
        if execution_id not in self._children and (recheck or not fresh):
            await self._list_children()
        return self._children.get(execution_id)

    async def _list_children(self) -> None:
        children: dict[str, str] = {}
        for stub in await self.api.list_jobs(self.settings.nomad_job_prefix):
            if stub.get("ParentID") not in self._parents:
                continue
            meta = stub.get("Meta")
            if meta is None:  # an agent that does not list meta: read the job
                job = await self.api.get_job(stub["ID"])
                meta = (job or {}).get("Meta") or {}
            if meta.get("execution_id"):
                children[str(meta["execution_id"])] = str(stub["ID"])
        self._children = children
        self._children_at = time.monotonic()
