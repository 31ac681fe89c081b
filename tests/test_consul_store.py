"""ConsulStore beyond the shared contract: layout, transaction limits, failures, settings."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import ssl
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import attrs
import httpx
import pytest

from pyexec.errors import BackendError, BackendUnavailable, Conflict, NotFound, PayloadTooLarge
from pyexec.models import (
    Execution,
    Reason,
    RunOutcome,
    Status,
    new_execution_id,
    parse_request,
    utcnow,
)
from pyexec.settings import Settings, SettingsError
from pyexec.store import CHUNK_SIZE
from pyexec.store.consul import COMMIT_OPS, MAX_TXN_OPS, ConsulStore
from pyexec.store.consul_http import ConsulEndpoint, ConsulHTTP
from pyexec.store.consul_keys import (
    Manifest,
    UploadClaim,
    execution_folder,
    manifest_key,
    record_key,
    status_key,
    tar_chunk_key,
    upload_key,
)

from . import fixtures_consul
from .fakes import replace_record
from .fixtures_consul import (
    ConsulServer,
    RecordingTransport,
    consul_settings_for,
    free_port,
    kv_delete,
    kv_keys,
    kv_put,
    kv_raw,
)

pytestmark = pytest.mark.anyio

# The shared fixtures, by name (tests/conftest.py may register the module instead).
consul_prefix = fixtures_consul.consul_prefix
consul_settings = fixtures_consul.consul_settings
consul_store = fixtures_consul.consul_store
consul_server = fixtures_consul.consul_server
consul_tls_server = fixtures_consul.consul_tls_server

MiB = 1024 * 1024


def new_record(**fields: Any) -> Execution:
    request = parse_request({"entrypoint": "main.py"}, Settings())
    return Execution(execution_id=new_execution_id(), request=request, **fields)


async def read_tar(store: ConsulStore, execution_id: str) -> bytes:
    return b"".join([chunk async for chunk in store.open_tar(execution_id)])


def folder_keys(store: ConsulStore, execution_id: str) -> list[str]:
    folder = execution_folder(store.prefix, execution_id)
    return [k[len(folder) :] for k in kv_keys(store.prefix) if k.startswith(folder)]


@pytest.fixture
async def recording_store(consul_settings: Settings) -> AsyncIterator[tuple[ConsulStore, Any]]:
    """A store with 1 KiB chunks whose HTTP requests are recorded (to count transactions)."""
    transport = RecordingTransport()
    store = ConsulStore.from_settings(consul_settings, transport=transport, chunk_size=1024)
    try:
        yield store, transport
    finally:
        await store.aclose()


# --- Layout and size ------------------------------------------------------------------


@pytest.mark.consul
async def test_20_mib_tar_round_trips_in_the_documented_layout(consul_store: ConsulStore) -> None:
    """A 20 MiB tar is stored as raw 256 KiB chunks plus manifest and reads back exactly."""
    data = os.urandom(20 * MiB)
    record = new_record()
    await consul_store.create(record, io.BytesIO(data))
    eid, prefix = record.execution_id, consul_store.prefix

    chunks = 20 * MiB // CHUNK_SIZE
    assert sorted(folder_keys(consul_store, eid)) == sorted(
        ["status", "status=pending", "record", "manifest", *(f"tar/{i:06d}" for i in range(chunks))]
    )
    assert kv_raw(status_key(prefix, eid)) == b"pending"
    stored = json.loads(kv_raw(record_key(prefix, eid)) or b"")
    assert record.request is not None
    assert stored["request"] == record.request.to_dict()
    assert stored["status"] == "pending"
    manifest = Manifest.from_json(kv_raw(manifest_key(prefix, eid)) or b"")
    assert manifest == Manifest(
        chunks=chunks, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
        chunk_size=CHUNK_SIZE,
    )  # fmt: skip
    # What a Nomad task sees with plain `GET /v1/kv/<key>?raw`:
    assert kv_raw(tar_chunk_key(prefix, eid, 3)) == data[3 * CHUNK_SIZE : 4 * CHUNK_SIZE]
    assert await read_tar(consul_store, eid) == data


@pytest.mark.consul
async def test_upload_filling_one_transaction_exactly_is_one_transaction(
    recording_store: tuple[ConsulStore, RecordingTransport],
) -> None:
    """A tar of (64 - commit ops) chunks goes in one transaction of exactly 64 operations."""
    store, transport = recording_store
    data = os.urandom(1024 * (MAX_TXN_OPS - COMMIT_OPS))
    record = new_record()
    await store.create(record, io.BytesIO(data))
    txns = transport.txns()
    assert [len(ops) for ops in txns] == [MAX_TXN_OPS]
    assert await read_tar(store, record.execution_id) == data


@pytest.mark.consul
async def test_one_chunk_more_splits_into_two_transactions(
    recording_store: tuple[ConsulStore, RecordingTransport],
) -> None:
    """One chunk over the single-transaction size: claim txn, one raw PUT, commit txn."""
    store, transport = recording_store
    data = os.urandom(1024 * (MAX_TXN_OPS - COMMIT_OPS + 1))
    record = new_record()
    await store.create(record, io.BytesIO(data))
    txns = transport.txns()
    assert [len(ops) for ops in txns] == [2 + MAX_TXN_OPS - COMMIT_OPS, COMMIT_OPS]
    last = tar_chunk_key(store.prefix, record.execution_id, MAX_TXN_OPS - COMMIT_OPS)
    assert [r.url.path for r in transport.requests if r.url.path.startswith("/v1/kv/")] == [
        f"/v1/kv/{last}"
    ]
    # The completion marker and the record come last, in the last transaction.
    last_keys = [op["KV"]["Key"] for op in txns[1]]
    assert manifest_key(store.prefix, record.execution_id) in last_keys
    assert record_key(store.prefix, record.execution_id) in last_keys
    first_writes = [op["KV"]["Key"] for op in txns[0] if op["KV"]["Verb"] in {"set", "cas"}]
    assert not [k for k in first_writes if k.endswith(("/manifest", "/record", "/status"))]
    assert "upload" not in folder_keys(store, record.execution_id)
    assert await read_tar(store, record.execution_id) == data


@pytest.mark.consul
async def test_large_tar_goes_as_raw_chunks_between_claim_and_commit(
    consul_settings: Settings,
) -> None:
    """Past the first transaction, chunks travel as raw create-only PUTs; txns stay <= 512 KiB."""
    transport = RecordingTransport()
    store = ConsulStore.from_settings(consul_settings, transport=transport)
    try:
        data = os.urandom(3 * MiB + 123)
        record = new_record()
        await store.create(record, io.BytesIO(data))
        txns = [r for r in transport.requests if r.url.path == "/v1/txn"]
        puts = [r for r in transport.requests if r.method == "PUT" and r not in txns]
        assert len(txns) == 2  # claim (with the first chunk), commit
        assert max(len(r.content) for r in txns) <= 512 * 1024
        assert len(puts) == 3 * MiB // CHUNK_SIZE  # every other chunk, plus the short last one
        assert all(r.url.params["cas"] == "0" for r in puts)
        assert sum(len(r.content) for r in puts) == len(data) - CHUNK_SIZE
        assert await read_tar(store, record.execution_id) == data
    finally:
        await store.aclose()


@pytest.mark.consul
@pytest.mark.parametrize("size", [10_000, 3 * MiB])
async def test_too_large_tar_is_413_and_leaves_nothing(
    consul_settings: Settings, size: int
) -> None:
    """A tar over max_tar_bytes raises PayloadTooLarge(tar_too_large) and no key remains."""
    settings = attrs.evolve(consul_settings, max_tar_bytes=size - 1)
    store = ConsulStore.from_settings(settings)
    try:
        record = new_record()
        with pytest.raises(PayloadTooLarge) as caught:
            await store.create(record, io.BytesIO(os.urandom(size)))
        assert caught.value.code == "tar_too_large"
        assert caught.value.status_code == 413
        assert folder_keys(store, record.execution_id) == []
    finally:
        await store.aclose()


class FailingReader(io.RawIOBase):
    """A tar source that breaks after ``good`` bytes, like a client that disconnects."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise OSError("client went away")
        n = min(size, self.left)
        self.left -= n
        return os.urandom(n)


@pytest.mark.consul
async def test_failed_upload_is_removed(consul_store: ConsulStore) -> None:
    """An upload that fails after several transactions deletes what it wrote."""
    record = new_record()
    with pytest.raises(OSError, match="client went away"):
        await consul_store.create(record, FailingReader(5 * CHUNK_SIZE))  # type: ignore[arg-type]
    assert folder_keys(consul_store, record.execution_id) == []
    with pytest.raises(NotFound):
        await consul_store.get(record.execution_id)


# --- Output ---------------------------------------------------------------------------


@pytest.mark.consul
async def test_large_output_is_chunked_and_replaced(consul_store: ConsulStore) -> None:
    """Output over the inline limit lives in output chunks; a rewrite drops the old chunks."""
    record = new_record()
    await consul_store.create(record, io.BytesIO(b"t"))
    stdout = "é" * 400_000  # 800 kB of UTF-8, split mid-character across chunks
    killed = record.finished(RunOutcome(reason=Reason.KILLED, stdout=stdout, stderr="e"))
    await replace_record(consul_store, killed, expect={Status.PENDING})
    stored = json.loads(kv_raw(record_key(consul_store.prefix, record.execution_id)) or b"")
    assert stored["stdout"] == ""
    assert stored["output"]["stdout"]["size"] == len(stdout.encode())
    assert len(json.dumps(stored)) < 4096
    first_keys = folder_keys(consul_store, record.execution_id)
    assert any(k.startswith("output/") and "/stdout/" in k for k in first_keys)
    got = await consul_store.get(record.execution_id)
    assert got.stdout == stdout
    assert got.stderr == "e"

    shorter = attrs.evolve(killed, stdout="x" * 100_000)
    await replace_record(consul_store, shorter, expect={Status.KILLED})
    keys = folder_keys(consul_store, record.execution_id)
    assert not {k for k in first_keys if k.startswith("output/")} & set(keys)
    assert (await consul_store.get(record.execution_id)).stdout == "x" * 100_000


# --- Reading damaged or incomplete data ----------------------------------------------


@pytest.mark.consul
async def test_tampered_chunk_fails_the_sha256_check(consul_store: ConsulStore) -> None:
    """A chunk changed behind the store's back makes open_tar raise BackendError."""
    data = os.urandom(2 * CHUNK_SIZE + 10)
    record = new_record()
    await consul_store.create(record, io.BytesIO(data))
    kv_put(tar_chunk_key(consul_store.prefix, record.execution_id, 1), os.urandom(CHUNK_SIZE))
    with pytest.raises(BackendError) as caught:
        await read_tar(consul_store, record.execution_id)
    assert caught.value.code == "store_error"


@pytest.mark.consul
async def test_missing_manifest_means_no_tar(consul_store: ConsulStore) -> None:
    """Without its completion marker a tar does not exist for readers (tar_not_found)."""
    record = new_record()
    await consul_store.create(record, io.BytesIO(b"data"))
    kv_delete(manifest_key(consul_store.prefix, record.execution_id))
    with pytest.raises(NotFound) as caught:
        await read_tar(consul_store, record.execution_id)
    assert caught.value.code == "tar_not_found"


@pytest.mark.consul
async def test_leftovers_are_invisible_and_expire_after_the_ttl(consul_store: ConsulStore) -> None:
    """A claim with chunks but no record is absent to readers and expired once past the TTL."""
    prefix, eid, debris = consul_store.prefix, new_execution_id(), new_execution_id()
    claim = UploadClaim(started_at=utcnow().isoformat().replace("+00:00", "Z"), owner="crashed")
    kv_put(upload_key(prefix, eid), claim.to_json().encode())
    kv_put(tar_chunk_key(prefix, eid, 0), b"half")
    kv_put(tar_chunk_key(prefix, debris, 0), b"orphan")  # neither claim nor record

    with pytest.raises(NotFound):
        await consul_store.get(eid)
    with pytest.raises(NotFound):
        await read_tar(consul_store, eid)
    assert eid not in [r.execution_id for r in await consul_store.list_active()]
    assert await consul_store.list_expired(utcnow(), 300) == [debris]
    expired = await consul_store.list_expired(utcnow() + timedelta(seconds=301), 300)
    assert sorted(expired) == sorted([eid, debris])
    for leftover in expired:
        await consul_store.delete(leftover)
    assert kv_keys(prefix) == []


# --- Unavailable Consul ----------------------------------------------------------------


async def test_unreachable_consul_is_store_unavailable() -> None:
    """Every call against a closed loopback port raises BackendUnavailable(store_unavailable)."""
    store = ConsulStore.from_settings(Settings(consul_addr=f"127.0.0.1:{free_port()}"))
    try:
        calls = [
            store.ping(),
            store.get(new_execution_id()),
            store.create(new_record(), io.BytesIO(b"x")),
            store.list_active(),
            store.wait_terminal(new_execution_id(), 1),
            store.delete(new_execution_id()),
        ]
        for call in calls:
            with pytest.raises(BackendUnavailable) as caught:
                await call
            assert caught.value.code == "store_unavailable"
            assert caught.value.status_code == 503
    finally:
        await store.aclose()


class KillingReader(io.RawIOBase):
    """Yields random bytes and kills the Consul server when ``kill_at`` bytes were read."""

    def __init__(self, server: ConsulServer, kill_at: int, total: int) -> None:
        self.server, self.kill_at, self.left, self.sent = server, kill_at, total, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.sent >= self.kill_at and self.server.proc is not None:
            self.server.kill()
        n = min(size, self.left)
        self.left -= n
        self.sent += n
        return os.urandom(n)


@pytest.mark.consul
async def test_consul_killed_mid_upload_leaves_only_an_expiring_leftover(
    consul_server: ConsulServer,
) -> None:
    """Consul dies mid-upload: 503; after its restart the same store works, the partial
    upload is invisible to readers, and the janitor removes it."""
    settings = consul_settings_for("pyexec-kill", addr=consul_server.addr)
    store = ConsulStore.from_settings(settings)
    try:
        record = new_record()
        reader = KillingReader(consul_server, kill_at=6 * CHUNK_SIZE, total=12 * CHUNK_SIZE)
        with pytest.raises(BackendUnavailable) as caught:
            await store.create(record, reader)  # type: ignore[arg-type]
        assert caught.value.code == "store_unavailable"

        consul_server.start()  # same data dir: what was committed before the kill is back
        await store.ping()  # the same client recovers by itself
        eid = record.execution_id
        left = [k for k in kv_keys("pyexec-kill", consul_server.addr) if eid in k]
        names = {k.rsplit(eid + "/", 1)[1] for k in left}
        assert "upload" in names  # chunk transactions did land before the kill...
        assert names - {"upload"} <= {f"tar/{i:06d}" for i in range(12)}
        assert not names & {"record", "manifest", "status"}  # ...but never the commit
        with pytest.raises(NotFound):
            await store.get(eid)
        assert eid not in await store.list_expired(utcnow(), 300)
        expired = await store.list_expired(utcnow() + timedelta(seconds=301), 300)
        assert expired == [eid]
        await store.delete(eid)
        assert [k for k in kv_keys("pyexec-kill", consul_server.addr) if eid in k] == []

        fresh = new_record()
        await store.create(fresh, io.BytesIO(b"after restart"))
        assert await read_tar(store, fresh.execution_id) == b"after restart"
    finally:
        await store.aclose()


# --- Blocking queries -----------------------------------------------------------------


def kv_entry(key: str, value: bytes, index: int) -> dict[str, Any]:
    return {"Key": key, "Value": base64.b64encode(value).decode(), "Flags": 0,
            "CreateIndex": 1, "ModifyIndex": index, "LockIndex": 0}  # fmt: skip


async def test_wait_terminal_restarts_when_the_index_goes_backwards() -> None:
    """A blocking query answering with a lower index makes the next query start from 0."""
    record = new_record(status=Status.RUNNING)
    done = record.finished(RunOutcome(reason=Reason.EXITED, exit_code=0))
    settings = Settings(consul_addr="127.0.0.1:8500", consul_prefix="p")
    skey, rkey = status_key("p", record.execution_id), record_key("p", record.execution_id)
    answers = iter([(100, b"running"), (50, b"running"), (60, b"running"), (61, b"completed")])
    seen_index: list[str | None] = []
    finished = False

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal finished
        path = request.url.path.removeprefix("/v1/kv/")
        if path == rkey:
            current = done if finished else record
            body = [kv_entry(rkey, json.dumps(current.to_dict(include_request=True)).encode(), 7)]
            return httpx.Response(200, json=body, headers={"X-Consul-Index": "7"})
        assert path == skey
        seen_index.append(request.url.params.get("index"))
        index, value = next(answers)
        finished = value == b"completed"
        return httpx.Response(
            200, json=[kv_entry(skey, value, index)], headers={"X-Consul-Index": str(index)}
        )

    store = ConsulStore.from_settings(settings, transport=httpx.MockTransport(handler))
    try:
        got = await store.wait_terminal(record.execution_id, 30)
    finally:
        await store.aclose()
    assert got.status is Status.COMPLETED
    assert seen_index == [None, "100", None, "60"]


# --- Settings at the edge ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("addr", "tls", "expected"),
    [
        ("127.0.0.1:8500", False, ConsulEndpoint("http", "127.0.0.1", 8500)),
        ("consul.service", False, ConsulEndpoint("http", "consul.service", 8500)),
        ("http://10.0.0.1:8501", False, ConsulEndpoint("http", "10.0.0.1", 8501)),
        ("https://consul.example", False, ConsulEndpoint("https", "consul.example", 443)),
        ("consul.example:8501", True, ConsulEndpoint("https", "consul.example", 8501)),
        ("[::1]:8500", False, ConsulEndpoint("http", "::1", 8500)),
    ],
)
def test_consul_addr_forms(addr: str, tls: bool, expected: ConsulEndpoint) -> None:
    """CONSUL_HTTP_ADDR forms parse to scheme, host and port (TLS files imply https)."""
    assert ConsulEndpoint.parse(addr, tls_configured=tls) == expected


@pytest.mark.parametrize("addr", ["ftp://h:1", "http://h:1/path", "h:notaport", ""])
def test_bad_consul_addr_is_a_settings_error(addr: str) -> None:
    """A malformed Consul address is a SettingsError, not a crash later."""
    with pytest.raises(SettingsError):
        ConsulEndpoint.parse(addr)


def test_plain_http_with_tls_files_is_refused() -> None:
    """An explicit http:// address with a CA file configured is refused: no silent downgrade."""
    settings = Settings(
        consul_addr="http://127.0.0.1:8500", consul_cacert="/etc/ssl/certs/ca-certificates.crt"
    )
    with pytest.raises(SettingsError):
        ConsulStore.from_settings(settings)


def test_missing_ca_file_is_a_settings_error() -> None:
    """A CA bundle path that does not exist fails at construction."""
    settings = Settings(consul_addr="https://127.0.0.1:8501", consul_cacert="/nonexistent/ca.pem")
    with pytest.raises(SettingsError):
        ConsulStore.from_settings(settings)


async def test_https_verifies_certificates() -> None:
    """With https the client verifies the server certificate and host name."""
    settings = Settings(
        consul_addr="https://127.0.0.1:8501", consul_cacert="/etc/ssl/certs/ca-certificates.crt"
    )
    client = ConsulHTTP.from_settings(settings, max_connections=1)
    try:
        ctx = client.verify
        assert isinstance(ctx, ssl.SSLContext)
        assert ctx.verify_mode is ssl.CERT_REQUIRED
        assert ctx.check_hostname
    finally:
        await client.aclose()


@pytest.mark.parametrize(("configured", "sent"), [("from-settings", "from-settings"), (None, None)])
async def test_token_comes_from_settings_not_the_environment(
    monkeypatch: pytest.MonkeyPatch, configured: str | None, sent: str | None
) -> None:
    """CONSUL_HTTP_TOKEN in the environment never overrides (or adds) the configured token."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-environment")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.9:1")
    tokens: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        tokens.append(request.headers.get("X-Consul-Token"))
        assert request.url.host == "127.0.0.1"
        if request.url.path == "/v1/txn":
            return httpx.Response(200, json={"Results": [], "Errors": None})
        return httpx.Response(404, headers={"X-Consul-Index": "1"})

    settings = Settings(consul_addr="127.0.0.1:8500", consul_token=configured)
    store = ConsulStore.from_settings(settings, transport=httpx.MockTransport(handler))
    try:
        await store.create(new_record(), io.BytesIO(b"x"))
        with pytest.raises(NotFound):
            await store.get(new_execution_id())
    finally:
        await store.aclose()
    assert tokens
    assert set(tokens) == {sent}


# --- Freeing a tar once it was fetched --------------------------------------------------


@pytest.mark.consul
@pytest.mark.parametrize("via_running", [True, False])
async def test_the_end_of_the_run_frees_the_tar(
    consul_store: ConsulStore, via_running: bool
) -> None:
    """The tar stays while the execution is pending or running (the Nomad client renders it
    into the run task from Consul); the transition to an end deletes tar and manifest in
    the same transaction, whether the run started or never did."""
    record = new_record()
    await consul_store.create(record, io.BytesIO(os.urandom(3 * CHUNK_SIZE)))
    await consul_store.transition(record.execution_id, lambda r: r, expect={Status.PENDING})
    assert "manifest" in folder_keys(consul_store, record.execution_id)
    if via_running:
        running = attrs.evolve(record, status=Status.RUNNING, started_at=utcnow())
        await replace_record(consul_store, running, expect={Status.PENDING})
        assert "manifest" in folder_keys(consul_store, record.execution_id)
        record = running
    ended = attrs.evolve(record, status=Status.FAILED, finished_at=utcnow())
    await replace_record(consul_store, ended, expect={record.status})
    assert sorted(folder_keys(consul_store, record.execution_id)) == [
        "record",
        "status",
        "status=failed",
    ]
    with pytest.raises(NotFound) as caught:
        await read_tar(consul_store, record.execution_id)
    assert caught.value.code == "tar_not_found"
    assert (await consul_store.get(record.execution_id)).status is Status.FAILED


@pytest.mark.consul
async def test_an_execution_without_a_tar_stores_record_and_status_only(
    consul_store: ConsulStore,
) -> None:
    """``create(record, None)`` (the runner gets the tar directly) writes no tar keys."""
    record = new_record()
    await consul_store.create(record, None)
    assert sorted(folder_keys(consul_store, record.execution_id)) == [
        "record",
        "status",
        "status=pending",
    ]
    assert await consul_store.get(record.execution_id) == record


# --- TLS against a real agent -----------------------------------------------------------


def tls_settings(server: ConsulServer, addr: str, **overrides: Any) -> Settings:
    files = {
        "consul_cacert": server.tls_file("ca"),
        "consul_client_cert": server.tls_file("client"),
        "consul_client_key": server.tls_file("client-key"),
    }
    files.update(overrides)
    return Settings(consul_addr=addr, consul_prefix="pyexec-tls", **files)


@pytest.mark.consul
@pytest.mark.parametrize("form", ["https://127.0.0.1:{port}", "127.0.0.1:{port}"])
async def test_mutual_tls_round_trip(consul_tls_server: ConsulServer, form: str) -> None:
    """With CA and client certificate the store works over https (TLS files imply https)."""
    addr = form.format(port=consul_tls_server.https_port)
    store = ConsulStore.from_settings(tls_settings(consul_tls_server, addr))
    try:
        await store.ping()
        record = new_record()
        data = os.urandom(CHUNK_SIZE + 5)
        await store.create(record, io.BytesIO(data))
        assert await read_tar(store, record.execution_id) == data
        await store.delete(record.execution_id)
    finally:
        await store.aclose()


@pytest.mark.consul
@pytest.mark.parametrize(
    "missing",
    [
        {"consul_cacert": None},  # the system store does not know this private CA
        {"consul_client_cert": None, "consul_client_key": None},  # the agent demands one
    ],
    ids=["unknown-ca", "no-client-cert"],
)
async def test_tls_failures_are_errors_not_downgrades(
    consul_tls_server: ConsulServer, missing: dict[str, None]
) -> None:
    """An untrusted server or a missing client certificate fails; nothing falls back to http."""
    addr = f"https://127.0.0.1:{consul_tls_server.https_port}"
    store = ConsulStore.from_settings(tls_settings(consul_tls_server, addr, **missing))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await store.ping()
        assert caught.value.code == "store_unavailable"
    finally:
        await store.aclose()


@pytest.mark.consul
async def test_two_store_instances_racing_to_terminal_have_one_winner(
    consul_settings: Settings,
) -> None:
    """Two replicas (separate clients) ending the same run differently: one verdict stands."""
    first = ConsulStore.from_settings(consul_settings)
    second = ConsulStore.from_settings(consul_settings)
    try:
        for _ in range(5):
            record = new_record()
            await first.create(record, io.BytesIO(b"t"))
            outcomes: list[Status | None] = []

            async def end(
                store: ConsulStore,
                reason: Reason,
                record: Execution = record,
                outcomes: list[Status | None] = outcomes,
            ) -> None:
                try:
                    done = record.finished(RunOutcome(reason=reason))
                    outcomes.append(
                        (await replace_record(store, done, expect={Status.PENDING})).status
                    )
                except Conflict:
                    outcomes.append(None)

            async with anyio.create_task_group() as tg:
                tg.start_soon(end, first, Reason.EXITED)
                tg.start_soon(end, second, Reason.KILLED)
            winners = [s for s in outcomes if s is not None]
            assert len(winners) == 1
            assert (await second.get(record.execution_id)).status is winners[0]
            assert (await first.get(record.execution_id)).status is winners[0]
    finally:
        await first.aclose()
        await second.aclose()
