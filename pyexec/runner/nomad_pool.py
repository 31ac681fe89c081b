"""The Nomad runner's warm pool: allocations dispatched ahead of time, one execution each.

A *slot* is a dispatch of a class's pool job (``nomad_job.pool_job``: the runner job's
run task, same sandbox and code, no network, no token) whose run task is already
running and waits for its inputs. The Nomad client renders them from the slot's folder
in Consul (``consul_keys.pool_inputs_folder``) with ``keyOrDefault``/``ls`` templates
(``change_mode = "noop"``): empty at first, re-rendered when the keys are written.

Handing a slot to an execution is **one Consul transaction**: a check-and-set of the
slot's key (``consul_keys.pool_slot_key``, from ``ready`` to ``claimed`` by that
execution) together with a copy of the execution's record, manifest and tar chunks into
the slot's folder. Either all of it lands or none: two service replicas sharing the
Consul never hand out the same slot (the loser's transaction fails its check and it
tries another slot, or the cold path), and the template never sees inputs of a slot
nobody owns. A transaction is bounded (``MAX_TXN_OPS`` operations, ``MAX_TXN_BYTES``
of body, values base64 inside it): an execution whose inputs do not fit takes the cold
path (miss ``too_large``).

Each service process keeps ``pool_size`` slots of its own per pooled image (the
request's class must be the default request's), made in the background a few at a
time, published in Consul once their run task runs. Any replica may claim any ready
slot. A slot is never handed out dead or stale: ``take`` skips one older than
``pool_max_idle_seconds`` and reads its allocation first (run task running, not
stopped). The owner replaces its slots at the idle limit (a check-and-set delete, so a
slot claimed meanwhile is left to its run), and anyone replaces a slot whose owner is
gone (a crashed process on the same host at start-up; any slot once past the limit
plus a margin). The run task itself gives up after the limit plus a margin
(``nomad_job.POOL_WAIT_MARGIN_SECONDS``), so even with no service left nothing waits
for ever. When Nomad cannot be reached the pool empties (keys withdrawn, jobs stopped
once Nomad answers again) and refills by itself with backoff. Shutdown withdraws and
purges every slot the process owns.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import attrs

from pyexec.errors import BackendError, BackendUnavailable, PyexecError
from pyexec.models import ExecutionRequest
from pyexec.runner import nomad_job
from pyexec.runner.docker_engine import owner_alive, owner_label
from pyexec.runner.nomad_http import NomadAPI, NomadError
from pyexec.runner.pool import REFILLS, PoolCore, PoolObserver, PoolShape, pooled_requests
from pyexec.settings import ResourceClass, Settings
from pyexec.store import consul_keys
from pyexec.store.consul_http import ConsulHTTP
from pyexec.store.consul_kv import MAX_TXN_BYTES, MAX_TXN_OPS, ConsulKV, kv_op

__all__ = ["NomadPool", "Slot"]

log = logging.getLogger("pyexec.runner.nomad_pool")

JSON = dict[str, Any]
#: While a slot is being made: the pause between looks at its allocation.
START_POLL_SECONDS = 0.1
#: A slot older than the idle limit plus this is anybody's to replace (its owner did
#: not: it is gone or stuck).
ORPHAN_GRACE_SECONDS = 30.0
#: Longest the shutdown's last look for this process's pool jobs may take.
CLOSE_SWEEP_SECONDS = 10.0
#: Why a request took the cold path although its image is pooled.
MISS_TOO_LARGE = "too_large"


@attrs.define(eq=False)
class Slot:
    """One pre-dispatched allocation waiting for its assignment."""

    slot_id: str
    job_id: str
    image: str
    class_name: str
    owner: str
    #: Wall-clock seconds when it was dispatched (shared between replicas).
    created: float
    alloc_id: str | None = None
    #: ModifyIndex of its key in Consul (the check of the claim).
    index: int = 0

    @property
    def age(self) -> float:
        return time.time() - self.created

    def value(self, **extra: Any) -> bytes:
        data = {
            "job": self.job_id,
            "alloc": self.alloc_id,
            "image": self.image,
            "class": self.class_name,
            "owner": self.owner,
            "created": self.created,
            **extra,
        }
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_entry(cls, slot_id: str, entry: JSON) -> tuple[Slot, JSON]:
        """A slot and its whole value from its Consul entry (``Value`` base64)."""
        data = json.loads(base64.b64decode(entry.get("Value") or ""))
        slot = cls(
            slot_id=slot_id,
            job_id=str(data["job"]),
            image=str(data["image"]),
            class_name=str(data["class"]),
            owner=str(data.get("owner") or ""),
            created=float(data["created"]),
            alloc_id=data.get("alloc"),
            index=int(entry["ModifyIndex"]),
        )
        return slot, data


@attrs.define(eq=False)
class Claim:
    """A slot handed to an execution."""

    slot: Slot
    #: The slot's allocation as read just before the claim.
    alloc: JSON
    #: When the execution got it (its run starts now, not when the slot was made).
    claimed_at: datetime


#: A pool's shape: (image, class name), made from its resource class.
_Shape = PoolShape[tuple[str, str], ResourceClass, Slot]


def _readable(entries: dict[str, JSON]) -> Iterator[tuple[Slot, JSON]]:
    """Each slot key's slot and whole value; a key that does not parse is skipped."""
    for slot_id, entry in entries.items():
        try:
            yield Slot.from_entry(slot_id, entry)
        except (KeyError, TypeError, ValueError):
            continue


def _waiting(alloc: JSON) -> bool:
    """Whether a slot's allocation still waits: wanted, and its run task running."""
    run = (alloc.get("TaskStates") or {}).get(nomad_job.TASKS["run"]) or {}
    return (
        alloc.get("DesiredStatus") == "run"
        and alloc.get("ClientStatus") == "running"
        and run.get("State") == "running"
    )


class NomadPool(PoolCore[tuple[str, str], ResourceClass, Slot]):
    """Slots kept ready per (image, class); see the module docstring."""

    noun = "pool slot"
    task_name = "pyexec-nomad-pool"

    def __init__(
        self,
        settings: Settings,
        api: NomadAPI,
        kv: ConsulKV,
        *,
        owner: str | None = None,
        observer: PoolObserver | None = None,
        refills: int = REFILLS,
    ) -> None:
        super().__init__(settings, observer=observer, refills=refills)
        self._api = api
        self._kv = kv
        self.owner = owner or owner_label()
        self._prefix = settings.consul_prefix
        #: Jobs to stop once Nomad answers again.
        self._doomed: set[str] = set()
        #: Claimed slots whose inputs the sweep dropped (their key stays a while).
        self._dropped_inputs: set[str] = set()

    @classmethod
    def from_settings(cls, settings: Settings, api: NomadAPI) -> NomadPool:
        """``pool_size`` slots per pooled image, of the class a default request gets."""
        kv = ConsulKV(
            ConsulHTTP.from_settings(settings, max_connections=8),
            ConsulHTTP.from_settings(settings, max_connections=1),
        )
        pool = cls(settings, api, kv)
        for request in pooled_requests(settings):
            pool.keep(request, settings.pool_size)
        return pool

    # --- what the runner uses --------------------------------------------------------------

    def keep(self, request: ExecutionRequest, size: int) -> None:
        """Keep ``size`` slots ready for requests shaped like ``request``."""
        resource_class = nomad_job.pick_class(self._settings, request.config)
        key = (request.docker_image, resource_class.name)
        self._keep(key, request.docker_image, resource_class, size)

    def _shape_of(self, request: ExecutionRequest) -> _Shape | None:
        """The pool serving ``request``: one that runs in the run task alone (no installer,
        no setup task), of a pooled image and class."""
        if request.requirements_txt.strip():
            return None
        if nomad_job.uses_setup_task(self._settings, request.pre_commands):
            return None
        resource_class = nomad_job.pick_class(self._settings, request.config)
        return self._shapes.get((request.docker_image, resource_class.name))

    async def startup(self, *, fill: bool = True) -> None:
        """Register the pool jobs Nomad lacks (never overwriting one; the runner's start-up
        has registered them already, a pool used on its own has not), sweep what crashed
        processes left, then start filling. ``fill=False`` (no pooled image): only the
        sweep, so slots an earlier process left are still cleaned up."""
        if fill and self._settings.nomad_register_jobs:
            for job in nomad_job.pool_jobs(self._settings):
                if await self._api.get_job(job["ID"]) is None:
                    await self._api.register_job(job)
        try:
            await self._sweep(startup=True)
        except PyexecError as exc:  # the maintainer sweeps again
            log.warning("could not sweep the warm pool: %s", exc.message)
        if fill:
            self.start()

    async def take(self, execution_id: str, request: ExecutionRequest) -> Claim | None:
        """A ready slot, now claimed for ``execution_id`` with its inputs delivered; ``None``
        when the request is not pooled, its inputs do not fit a transaction or no slot
        is ready (the caller dispatches cold)."""
        image = request.docker_image
        shape = None if self._closed else self._shape_of(request)
        if shape is None:
            self._miss(image, "unpooled")
            return None
        # The inputs and the oldest slot's allocation are read at once (one round trip
        # less on the path every pooled run takes); the slot is set aside meanwhile.
        first = shape.ready.pop(0) if shape.ready else None
        inputs, alloc = await asyncio.gather(
            self._inputs(execution_id), self._read_alloc(first), return_exceptions=True
        )
        if isinstance(inputs, BaseException) or inputs is None:
            if first is not None:
                shape.ready.insert(0, first)
            if isinstance(inputs, BaseException):
                raise inputs
            self._miss(image, MISS_TOO_LARGE)
            return None
        if first is not None:
            claim = await self._claim(first, execution_id, inputs, alloc)
            if claim is not None:
                return self._served(claim)
        for slot in list(shape.ready):  # its own, the oldest first
            claim = await self._claim(slot, execution_id, inputs)
            if claim is not None:
                return self._served(claim)
        for slot in await self._others(shape):
            claim = await self._claim(slot, execution_id, inputs)
            if claim is not None:
                return self._served(claim)
        self._miss(image, "empty")
        return None

    def _served(self, claim: Claim) -> Claim:
        self._hit(claim.slot)
        self._wake.set()
        return claim

    async def find(self, execution_id: str) -> tuple[str, str, datetime] | None:
        """(slot, job, claimed at) of the slot claimed for ``execution_id``, if any (a
        restarted service adopts the run by it)."""
        for slot, data in _readable(await self._slot_entries()):
            if data.get("execution_id") == execution_id:
                claimed = datetime.fromtimestamp(float(data.get("claimed_at") or 0), UTC)
                return slot.slot_id, slot.job_id, claimed
        return None

    async def release(self, slot_id: str) -> None:
        """A claimed slot's run is over: drop its key and its copy of the inputs (the job
        is purged with the run's, by the runner)."""
        try:
            await self._kv.delete_tree(consul_keys.pool_inputs_folder(self._prefix, slot_id))
            await self._kv.client.request(
                "DELETE", f"/v1/kv/{consul_keys.pool_slot_key(self._prefix, slot_id)}"
            )
        except PyexecError as exc:  # the sweep finds it later
            log.warning("could not drop the keys of pool slot %s: %s", slot_id, exc.message)
        else:
            self._dropped_inputs.discard(slot_id)

    def owned_jobs(self) -> set[str]:
        """Pool jobs this process dispatched and still holds (ready or being made)."""
        return set(self._owned)

    async def wait_ready(self, count: int, timeout: float) -> None:
        """Until every pooled image has ``count`` slots ready; ``TimeoutError`` after
        ``timeout`` seconds."""
        await self._wait_ready(count, timeout)

    async def _discard(self, items: list[Slot]) -> None:
        """Withdraw and purge ready slots (at shutdown: shielded, one by one)."""
        for slot in items:
            with anyio.CancelScope(shield=True):
                await self._withdraw(slot)

    async def _after_close(self) -> None:
        """Purge every job this process still holds, then the ones no claim names."""
        for job_id in list(self._owned | self._doomed):
            with anyio.CancelScope(shield=True):
                await self._stop(job_id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_SWEEP_SECONDS):
            await self._stop_unclaimed_of_mine()
        await self._kv.aclose()

    async def _stop_unclaimed_of_mine(self) -> None:
        """Stop every pool job this process dispatched that no execution claimed: also one
        whose dispatch answer a cancelled refill never got."""
        try:
            entries = await self._slot_entries()
            claimed = set()
            for slot, data in _readable(entries):
                if data.get("state") != "ready":
                    claimed.add(slot.job_id)
            for stub in await self._pool_stubs():
                owner = (stub.get("Meta") or {}).get("owner")
                if (
                    owner == self.owner
                    and stub.get("Status") != "dead"
                    and stub["ID"] not in claimed
                ):
                    await self._stop(str(stub["ID"]))
        except PyexecError as exc:
            log.warning("could not sweep this process's pool jobs at shutdown: %s", exc.message)

    # --- claiming --------------------------------------------------------------------------

    async def _inputs(self, execution_id: str) -> list[tuple[str, str]] | None:
        """The execution's record, manifest and tar chunks as (name in the slot folder,
        base64 value); ``None`` when they would not fit one claim transaction."""
        folder = consul_keys.execution_folder(self._prefix, execution_id)
        response = await self._kv.client.request(
            "GET", f"/v1/kv/{folder}", params={"recurse": ""}, ok=(404,)
        )
        if response.status_code == 404:
            raise BackendError(f"execution {execution_id} has no keys in Consul", code="not_found")
        wanted: list[tuple[str, str]] = []
        for entry in response.json():
            name = str(entry["Key"])[len(folder) :]
            if name in ("record", "manifest") or (name.startswith("tar/") and name.count("/") == 1):
                wanted.append((name, entry.get("Value") or ""))
        size = sum(len(value) + len(name) + 200 for name, value in wanted)
        if len(wanted) + 1 > MAX_TXN_OPS or size + 1024 > MAX_TXN_BYTES:
            return None
        return wanted

    async def _others(self, shape: _Shape) -> list[Slot]:
        """Ready slots of other service processes for ``shape``, the oldest first."""
        others: list[Slot] = []
        for slot, data in _readable(await self._slot_entries()):
            if (
                data.get("state") == "ready"
                and slot.owner != self.owner
                and (slot.image, slot.class_name) == (shape.image, shape.spec.name)
            ):
                others.append(slot)
        return sorted(others, key=lambda s: s.created)

    async def _read_alloc(self, slot: Slot | None) -> JSON | None:
        if slot is None or slot.alloc_id is None:
            return None
        return await self._api.allocation(slot.alloc_id)

    async def _claim(
        self,
        slot: Slot,
        execution_id: str,
        inputs: list[tuple[str, str]],
        read: JSON | BaseException | None = None,
    ) -> Claim | None:
        """Claim ``slot`` for ``execution_id`` and deliver its inputs in one transaction,
        if it is fresh and its allocation (``read`` already, or read here) still waits;
        ``None`` otherwise (dropped)."""
        shape = self._shapes.get((slot.image, slot.class_name))
        if shape is not None and slot in shape.ready:
            shape.ready.remove(slot)  # from here on it is never offered again
        if not self._fresh(slot) or slot.alloc_id is None:
            log.debug("pool slot %s is too old to use", slot.slot_id)
            if slot.owner == self.owner:
                self._spawn(self._withdraw(slot))
            return None
        try:
            if isinstance(read, BaseException):
                raise read
            alloc = read if read is not None else await self._api.allocation(slot.alloc_id)
        except PyexecError as exc:
            log.info("pool slot %s cannot be read (%s): not used", slot.slot_id, exc.message)
            if slot.owner == self.owner:
                self._spawn(self._withdraw(slot))
            return None
        if not _waiting(alloc):
            log.info(
                "pool slot %s no longer waits (%s): not used",
                slot.slot_id,
                alloc.get("ClientStatus"),
            )
            if slot.owner == self.owner:
                self._spawn(self._withdraw(slot))
            return None
        now = time.time()
        key = consul_keys.pool_slot_key(self._prefix, slot.slot_id)
        folder = consul_keys.pool_inputs_folder(self._prefix, slot.slot_id)
        claimed = slot.value(state="claimed", execution_id=execution_id, claimed_at=now)
        ops = [kv_op("cas", key, claimed, index=slot.index)]
        ops += [
            json.dumps({"KV": {"Verb": "set", "Key": folder + name, "Value": value}})
            for name, value in inputs
        ]
        result = await self._kv.txn(ops)
        if not result.ok:  # another replica claimed or withdrew it first
            log.debug("pool slot %s was claimed or withdrawn first", slot.slot_id)
            self._owned.discard(slot.job_id)
            return None
        self._owned.discard(slot.job_id)
        return Claim(slot, alloc, datetime.fromtimestamp(now, UTC))

    # --- filling ---------------------------------------------------------------------------

    def _check_failed(self, exc: PyexecError) -> bool:
        """Nomad unreachable or without a leader: an outage."""
        if isinstance(exc, (BackendUnavailable, NomadError)):
            self._on_outage(exc)
            return True
        return False

    async def _refill_failed(self, exc: PyexecError) -> None:
        if isinstance(exc, BackendUnavailable) and exc.code == "runner_unavailable":
            self._on_outage(exc)

    def _on_outage(self, exc: PyexecError) -> None:
        if not self._outage:
            log.warning("warm pool: %s; emptying it until it answers", exc.message)
        self._outage = True
        for slot in self._take_all_ready():
            self._doomed.add(slot.job_id)
            self._spawn(self._withdraw(slot, stop=False))

    async def _check(self) -> None:
        """One look: Nomad answers (else an outage), slots that died, were claimed by
        another replica or expired leave; doomed jobs are stopped; orphans swept."""
        await self._api.leader()
        self._outage = False
        for job_id in list(self._doomed):
            await self._stop(job_id)
        # Only slots published before the listing can be judged by it.
        listed = set(self._all_ready())
        entries = await self._slot_entries()
        stubs = await self._pool_stubs()
        dead = {str(s["ID"]) for s in stubs if s.get("Status") == "dead" or s.get("Stop")}
        for shape in self._shapes.values():
            keep: list[Slot] = []
            for slot in shape.ready:
                entry = entries.get(slot.slot_id)
                if slot not in listed:
                    keep.append(slot)
                elif entry is None or int(entry["ModifyIndex"]) != slot.index:
                    log.info("pool slot %s was claimed or withdrawn elsewhere", slot.slot_id)
                    self._owned.discard(slot.job_id)
                elif not self._fresh(slot) or slot.job_id in dead:
                    log.info("pool slot %s expired or ended: replaced", slot.slot_id)
                    self._spawn(self._withdraw(slot))
                else:
                    keep.append(slot)
            shape.ready = keep
        await self._sweep(startup=False, entries=entries, stubs=stubs, dead=dead)

    async def _pool_stubs(self) -> list[JSON]:
        """Every dispatched pool job Nomad lists, of every class."""
        stubs: list[JSON] = []
        for resource_class in self._settings.nomad_resource_classes:
            parent = nomad_job.pool_job_id(self._settings, resource_class)
            stubs += await self._api.list_jobs(parent + "/")
        return stubs

    async def _make(self, shape: _Shape) -> Slot | None:
        """Dispatch one slot, wait for its run task to run, publish it; on failure stop
        what was dispatched."""
        job_id: str | None = None
        slot_id = secrets.token_hex(8)
        try:
            async with self._refilling:
                parent = nomad_job.pool_job_id(self._settings, shape.spec)
                meta = {
                    "slot": slot_id,
                    "image": shape.image,
                    "owner": self.owner,
                    "wait": str(nomad_job.pool_wait_seconds(self._settings)),
                }
                created = time.time()
                answer = await self._api.dispatch(parent, meta, slot_id)
                job_id = str(answer["DispatchedJobID"])
                self._owned.add(job_id)
                alloc_id = await self._started(job_id)
            slot = Slot(slot_id, job_id, shape.image, shape.spec.name, self.owner, created)
            slot.alloc_id = alloc_id
            key = consul_keys.pool_slot_key(self._prefix, slot_id)
            result = await self._kv.txn([kv_op("cas", key, slot.value(state="ready"), index=0)])
            index = result.modify_index(key)
            if not result.ok or index is None:
                raise BackendError(
                    f"pool slot {slot_id} could not be published", code="store_error"
                )
            slot.index = index
        except PyexecError:
            if job_id is not None:
                self._doomed.add(job_id)
                self._owned.discard(job_id)
            raise
        if self._closed:
            await self._withdraw(slot)
            return None
        return slot

    async def _started(self, job_id: str) -> str:
        """The allocation of a just dispatched slot once its run task runs (its templates
        rendered); a ``BackendError`` if it ends first or is not running within the
        placement timeout."""
        deadline = time.monotonic() + self._settings.nomad_placement_timeout
        while time.monotonic() < deadline:
            allocs = await self._api.job_allocations(job_id)
            if allocs:
                latest = max(allocs, key=lambda a: int(a.get("CreateIndex") or 0))
                if _waiting(latest):
                    return str(latest["ID"])
                if latest.get("ClientStatus") in ("complete", "failed", "lost"):
                    raise BackendError(
                        f"pool slot {job_id} ended before it was ready", code="pool_slot_failed"
                    )
            await asyncio.sleep(START_POLL_SECONDS)
        raise BackendError(
            f"pool slot {job_id} was not running within "
            f"{self._settings.nomad_placement_timeout:.0f} s",
            code="pool_slot_unplaced",
        )

    # --- removing --------------------------------------------------------------------------

    async def _withdraw(self, slot: Slot, *, stop: bool = True) -> None:
        """Take a ready slot out of Consul (check-and-set: one claimed meanwhile is its
        run's and stays), then stop its job."""
        key = consul_keys.pool_slot_key(self._prefix, slot.slot_id)
        try:
            result = await self._kv.txn([kv_op("delete-cas", key, index=slot.index)])
        except PyexecError as exc:
            log.warning("could not withdraw pool slot %s: %s", slot.slot_id, exc.message)
            self._doomed.add(slot.job_id)
            return
        if not result.ok:
            self._owned.discard(slot.job_id)  # claimed first: the run owns it now
            return
        if stop:
            await self._stop(slot.job_id)
        else:
            self._doomed.add(slot.job_id)

    async def _stop(self, job_id: str) -> None:
        try:
            await self._api.stop_job(job_id, purge=True)
        except PyexecError as exc:
            log.info("could not stop pool job %s (retried): %s", job_id, exc.message)
            self._doomed.add(job_id)
            return
        self._doomed.discard(job_id)
        self._owned.discard(job_id)

    async def _slot_entries(self) -> dict[str, JSON]:
        root = consul_keys.pool_slots_root(self._prefix)
        response = await self._kv.client.request(
            "GET", f"/v1/kv/{root}", params={"recurse": ""}, ok=(404,)
        )
        if response.status_code == 404:
            return {}
        entries: dict[str, JSON] = {}
        for entry in response.json():
            slot_id = str(entry["Key"])[len(root) :]
            if slot_id and "/" not in slot_id:
                entries[slot_id] = entry
        return entries

    async def _sweep(
        self,
        *,
        startup: bool,
        entries: dict[str, JSON] | None = None,
        stubs: list[JSON] | None = None,
        dead: Iterable[str] = (),
    ) -> None:
        """Replace slots nobody will: ready ones of a process that is gone (same host, at
        start-up) or past the idle limit plus a margin; pool jobs with no key whose owner
        is gone or that are that old; keys of slots whose job Nomad no longer runs.
        A claimed slot's inputs go once its job is dead (whoever ran it died before it
        dropped them), its key once Nomad no longer has the job (a restarted service
        finds a finished run by that key until then)."""
        if entries is None:
            entries = await self._slot_entries()
        if stubs is None:
            stubs = await self._pool_stubs()
        listed = {str(s["ID"]) for s in stubs}
        limit = self._settings.pool_max_idle_seconds + ORPHAN_GRACE_SECONDS
        dead = set(dead) | {str(s["ID"]) for s in stubs if s.get("Status") == "dead"}
        keyed: set[str] = set()
        mine = {s.slot_id for s in self._all_ready()}
        for slot, data in _readable(entries):
            slot_id = slot.slot_id
            keyed.add(slot.job_id)
            if data.get("state") == "claimed":
                since = time.time() - float(data.get("claimed_at") or 0)
                if slot.job_id not in listed and since > ORPHAN_GRACE_SECONDS:
                    await self.release(slot_id)
                elif slot.job_id in dead and slot_id not in self._dropped_inputs:
                    await self._kv.delete_tree(
                        consul_keys.pool_inputs_folder(self._prefix, slot_id)
                    )
                    self._dropped_inputs.add(slot_id)
                continue
            if data.get("state") != "ready" or slot_id in mine or slot.owner == self.owner:
                continue
            gone = startup and not owner_alive(slot.owner) and _same_host(slot.owner, self.owner)
            if gone or slot.age > limit or slot.job_id in dead:
                await self._withdraw(slot)
        for stub in stubs:
            job_id = str(stub["ID"])
            if job_id in keyed or job_id in self._owned or stub.get("Status") == "dead":
                continue
            owner = str((stub.get("Meta") or {}).get("owner") or "")
            age = time.time() - int(stub.get("SubmitTime") or 0) / 1e9
            gone = not owner_alive(owner) and _same_host(owner, self.owner)
            if gone or age > limit:
                await self._stop(job_id)


def _same_host(owner: str, mine: str) -> bool:
    return bool(owner) and owner.partition(":")[0] == mine.partition(":")[0]
