"""The Store contract, run against every backend: the in-process store and Consul."""

from __future__ import annotations

import io
import os
from datetime import timedelta

import anyio
import attrs
import pytest

from pyexec.errors import Conflict, IdempotentReplay, NotFound
from pyexec.models import (
    TERMINAL,
    TRANSITIONS,
    CallbackState,
    Execution,
    IdempotencyKey,
    Reason,
    RunOutcome,
    Status,
    new_execution_id,
    parse_request,
    utcnow,
)
from pyexec.settings import Settings
from pyexec.store import Store

from . import fixtures_consul
from .fakes import replace_record

pytestmark = pytest.mark.anyio

# The shared fixtures, by name (tests/conftest.py may register the module instead).
consul_prefix = fixtures_consul.consul_prefix
consul_settings = fixtures_consul.consul_settings

REASON_FOR = {Status.COMPLETED: Reason.EXITED, Status.FAILED: Reason.TIMEOUT,
              Status.KILLED: Reason.KILLED}  # fmt: skip


store = fixtures_consul.store


def new_record() -> Execution:
    meta = parse_request(
        {"entrypoint": "app/main.py", "stdin": "hi", "env_vars": ["A=1"]}, Settings()
    )
    return Execution(execution_id=new_execution_id(), request=meta)


def moved_to(record: Execution, status: Status) -> Execution:
    """``record`` as a writer would store it in ``status``."""
    if status is Status.RUNNING:
        return attrs.evolve(record, status=status, started_at=utcnow())
    if status is Status.PENDING:
        return attrs.evolve(record, status=status)
    return record.finished(RunOutcome(reason=REASON_FOR[status], exit_code=0, stdout="out\n"))


async def created(store: Store, tar: bytes = b"tar bytes") -> Execution:
    record = new_record()
    await store.create(record, io.BytesIO(tar))
    return record


async def at_status(store: Store, status: Status) -> Execution:
    """A stored execution that went through legal steps to ``status``."""
    record = await created(store)
    if status is Status.PENDING:
        return record
    if status is not Status.RUNNING:
        return await replace_record(store, moved_to(record, status), expect={Status.PENDING})
    return await replace_record(store, moved_to(record, Status.RUNNING), expect={Status.PENDING})


async def read_tar(store: Store, execution_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.open_tar(execution_id)])


async def test_create_then_get_returns_the_record_with_its_request(store: Store) -> None:
    """A created record reads back equal, request metadata included."""
    record = await created(store)
    got = await store.get(record.execution_id)
    assert got.to_dict(include_request=True) == record.to_dict(include_request=True)
    assert got.request is not None
    assert got.request.entrypoint == "app/main.py"


async def test_create_twice_conflicts_and_keeps_the_first_tar(store: Store) -> None:
    """Creating an id that exists is Conflict(already_exists); the stored tar stays."""
    record = await created(store, b"first")
    with pytest.raises(Conflict) as caught:
        await store.create(record, io.BytesIO(b"second"))
    assert caught.value.code == "already_exists"
    assert await read_tar(store, record.execution_id) == b"first"


async def test_get_unknown_is_not_found(store: Store) -> None:
    """Reading an unknown id raises NotFound(execution_not_found)."""
    with pytest.raises(NotFound) as caught:
        await store.get(new_execution_id())
    assert caught.value.code == "execution_not_found"


LEGAL = [(a, b) for a in Status for b in TRANSITIONS[a]]
ILLEGAL = [(a, b) for a in Status for b in Status if b not in TRANSITIONS[a] and a != b]


@pytest.mark.parametrize(("start", "end"), LEGAL, ids=lambda s: s.value)
async def test_legal_transition_is_stored(store: Store, start: Status, end: Status) -> None:
    """Every legal transition succeeds and is what a later read returns."""
    record = await at_status(store, start)
    stored = await replace_record(store, moved_to(record, end), expect={start})
    assert stored.status is end
    got = await store.get(record.execution_id)
    assert got.status is end
    assert got.to_dict() == stored.to_dict()


@pytest.mark.parametrize(("start", "end"), ILLEGAL, ids=lambda s: s.value)
async def test_illegal_transition_conflicts(store: Store, start: Status, end: Status) -> None:
    """An illegal transition is Conflict(invalid_transition), even when expect allows it."""
    record = await at_status(store, start)
    with pytest.raises(Conflict) as caught:
        await replace_record(store, moved_to(record, end), expect=set(Status))
    assert caught.value.code == "invalid_transition"
    assert (await store.get(record.execution_id)).status is start


async def test_update_checks_expected_status(store: Store) -> None:
    """An update whose expected status does not match the stored one is refused."""
    record = await at_status(store, Status.PENDING)
    with pytest.raises(Conflict) as caught:
        await replace_record(store, moved_to(record, Status.COMPLETED), expect={Status.RUNNING})
    assert caught.value.code == "invalid_transition"
    assert (await store.get(record.execution_id)).status is Status.PENDING


async def test_update_of_unknown_is_not_found(store: Store) -> None:
    """Updating an id that does not exist raises NotFound."""
    with pytest.raises(NotFound):
        await replace_record(store, moved_to(new_record(), Status.RUNNING), expect={Status.PENDING})


async def race(
    store: Store, record: Execution, targets: list[Status], expect: Status
) -> dict[Status, Execution | Conflict]:
    """Start one update per target at once; what each writer got back."""
    results: dict[Status, Execution | Conflict] = {}

    async def attempt(target: Status) -> None:
        try:
            results[target] = await replace_record(store, moved_to(record, target), expect={expect})
        except Conflict as exc:
            results[target] = exc

    async with anyio.create_task_group() as tg:
        for target in targets:
            tg.start_soon(attempt, target)
    return results


async def test_concurrent_updates_from_pending_have_one_winner(store: Store) -> None:
    """Two writers racing from pending: exactly one wins, the other gets invalid_transition."""
    for _ in range(6):
        record = await at_status(store, Status.PENDING)
        results = await race(store, record, [Status.RUNNING, Status.KILLED], Status.PENDING)
        winners = [s for s, r in results.items() if isinstance(r, Execution)]
        losers = [r for r in results.values() if isinstance(r, Conflict)]
        assert len(winners) == 1
        assert len(losers) == 1
        assert losers[0].code == "invalid_transition"
        assert (await store.get(record.execution_id)).status is winners[0]


async def test_racing_terminal_updates_store_exactly_one(store: Store) -> None:
    """Three writers racing from running to different ends: one ending sticks."""
    record = await at_status(store, Status.RUNNING)
    results = await race(store, record, sorted(TERMINAL), Status.RUNNING)
    winners = [s for s, r in results.items() if isinstance(r, Execution)]
    assert len(winners) == 1
    assert (await store.get(record.execution_id)).status is winners[0]


@pytest.mark.parametrize("end", sorted(TERMINAL), ids=lambda s: s.value)
async def test_terminal_status_never_changes(store: Store, end: Status) -> None:
    """Once terminal, no update to another status succeeds, whatever it expects."""
    record = await at_status(store, end)
    for other in Status:
        if other is end:
            continue
        with pytest.raises(Conflict):
            await replace_record(store, moved_to(record, other), expect=set(Status))
    assert (await store.get(record.execution_id)).status is end


async def test_delete_is_idempotent(store: Store) -> None:
    """Deleting removes record and tar; deleting again, or an unknown id, succeeds."""
    record = await created(store)
    await store.delete(record.execution_id)
    await store.delete(record.execution_id)
    await store.delete(new_execution_id())
    with pytest.raises(NotFound):
        await store.get(record.execution_id)
    with pytest.raises(NotFound):
        await read_tar(store, record.execution_id)


async def test_list_active_holds_pending_and_running_only(store: Store) -> None:
    """list_active returns pending and running records, not terminal ones."""
    pending = await at_status(store, Status.PENDING)
    running = await at_status(store, Status.RUNNING)
    done = await at_status(store, Status.COMPLETED)
    active = {r.execution_id: r.status for r in await store.list_active()}
    assert active[pending.execution_id] is Status.PENDING
    assert active[running.execution_id] is Status.RUNNING
    assert done.execution_id not in active


async def test_list_expired_holds_terminal_records_past_the_ttl(store: Store) -> None:
    """list_expired returns terminal records finished longer than ttl ago, nothing else."""
    done = await at_status(store, Status.FAILED)
    active = await at_status(store, Status.RUNNING)
    assert done.finished_at is not None
    assert done.execution_id not in await store.list_expired(done.finished_at, 60)
    later = done.finished_at + timedelta(seconds=61)
    expired = await store.list_expired(later, 60)
    assert done.execution_id in expired
    assert active.execution_id not in expired


async def test_wait_terminal_wakes_on_update(store: Store) -> None:
    """A waiter returns the terminal record as soon as it is stored, long before its deadline."""
    record = await at_status(store, Status.RUNNING)
    seen: list[Execution] = []

    async def wait() -> None:
        seen.append(await store.wait_terminal(record.execution_id, 30))

    started = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        # Give the waiter time to park; the assertions hold either way.
        await anyio.sleep(0.2)
        await replace_record(store, moved_to(record, Status.COMPLETED), expect={Status.RUNNING})
    assert seen[0].status is Status.COMPLETED
    assert seen[0].stdout == "out\n"
    assert anyio.current_time() - started < 10


async def test_wait_terminal_returns_at_the_deadline(store: Store) -> None:
    """Without an update, wait_terminal returns the unchanged record once the timeout passes."""
    record = await at_status(store, Status.PENDING)
    started = anyio.current_time()
    got = await store.wait_terminal(record.execution_id, 0.5)
    elapsed = anyio.current_time() - started
    assert got.status is Status.PENDING
    assert 0.4 <= elapsed < 5


async def test_wait_terminal_of_unknown_is_not_found(store: Store) -> None:
    """Waiting on an unknown id raises NotFound."""
    with pytest.raises(NotFound):
        await store.wait_terminal(new_execution_id(), 1)


@pytest.mark.parametrize("size", [0, 1, 256 * 1024, 1024 * 1024 + 7])
async def test_tar_round_trips(store: Store, size: int) -> None:
    """The tar reads back byte for byte, whatever its size against the chunk size."""
    data = os.urandom(size)
    record = await created(store, data)
    assert await read_tar(store, record.execution_id) == data


async def test_the_tar_is_freed_once_the_execution_is_over(store: Store) -> None:
    """A stored tar is kept while the run may still read it (a Nomad client renders it into
    the run task as that starts); once the execution is over the store no longer holds it."""
    record = await created(store, b"needed once")
    assert await read_tar(store, record.execution_id) == b"needed once"
    running = moved_to(record, Status.RUNNING)
    await replace_record(store, running, expect={Status.PENDING})
    assert await read_tar(store, record.execution_id) == b"needed once"
    await replace_record(store, moved_to(running, Status.COMPLETED), expect={Status.RUNNING})
    with pytest.raises(NotFound) as caught:
        await read_tar(store, record.execution_id)
    assert caught.value.code == "tar_not_found"


async def test_a_record_created_without_a_tar_has_none(store: Store) -> None:
    """``create(record, None)`` keeps the record only; ``open_tar`` says there is no tar."""
    record = new_record()
    await store.create(record, None)
    assert await store.get(record.execution_id) == record
    with pytest.raises(NotFound) as caught:
        await read_tar(store, record.execution_id)
    assert caught.value.code == "tar_not_found"


async def test_open_tar_of_unknown_is_not_found(store: Store) -> None:
    """Opening the tar of an unknown id raises NotFound(execution_not_found)."""
    with pytest.raises(NotFound) as caught:
        await read_tar(store, new_execution_id())
    assert caught.value.code == "execution_not_found"


# --- Idempotency keys --------------------------------------------------------------------


def keyed(key: str, fingerprint: str) -> Execution:
    return attrs.evolve(new_record(), idempotency=IdempotencyKey(key=key, fingerprint=fingerprint))


async def test_an_idempotency_key_is_held_by_one_record(store: Store) -> None:
    """A second create with a taken key stores nothing and names the holder and its request."""
    first = keyed("k" * 64, "f1")
    await store.create(first, io.BytesIO(b"tar"))
    second = keyed("k" * 64, "f2")
    with pytest.raises(IdempotentReplay) as replay:
        await store.create(second, io.BytesIO(b"tar"))
    assert (replay.value.execution_id, replay.value.fingerprint) == (first.execution_id, "f1")
    with pytest.raises(NotFound):
        await store.get(second.execution_id)
    assert (await store.get(first.execution_id)).idempotency == first.idempotency


async def test_concurrent_creates_with_one_key_store_one(store: Store) -> None:
    """Of creates racing with one key, exactly one is stored; the others are replays of it."""
    records = [keyed("r" * 64, "same") for _ in range(4)]
    outcomes: list[str] = []

    async def create(record: Execution) -> None:
        try:
            await store.create(record, io.BytesIO(os.urandom(1024)))
            outcomes.append(record.execution_id)
        except IdempotentReplay as replay:
            outcomes.append(f"replay:{replay.execution_id}")

    async with anyio.create_task_group() as group:
        for record in records:
            group.start_soon(create, record)
    winners = [o for o in outcomes if not o.startswith("replay:")]
    assert len(winners) == 1
    assert sorted(outcomes) == sorted([winners[0]] + [f"replay:{winners[0]}"] * 3)


async def test_the_key_expires_with_its_record(store: Store) -> None:
    """Deleting the record frees its key for a new execution."""
    first = keyed("e" * 64, "f")
    await store.create(first, io.BytesIO(b"tar"))
    await store.delete(first.execution_id)
    again = keyed("e" * 64, "f")
    await store.create(again, io.BytesIO(b"tar"))
    assert (await store.get(again.execution_id)).execution_id == again.execution_id


async def test_callback_state_round_trips(store: Store) -> None:
    """A terminal record's callback state is stored and read back unchanged."""
    record = await at_status(store, Status.COMPLETED)
    state = CallbackState(status="failed", attempts=3, last_error="HTTP 500")
    stored = await store.transition(
        record.execution_id, lambda r: attrs.evolve(r, callback=state), expect=TERMINAL
    )
    assert stored.callback == state
    assert (await store.get(record.execution_id)).callback == state
