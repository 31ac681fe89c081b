"""Consul fixtures and helpers shared by the store tests (and anyone else who needs Consul).

Load with ``pytest_plugins = ["tests.fixtures_consul"]`` (or from ``conftest.py``). Every test
gets a unique random KV prefix, deleted afterwards. The agent is ``127.0.0.1:8500``
unless ``PYEXEC_TEST_CONSUL_ADDR`` says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import httpx
import pytest

from pyexec.settings import Settings
from pyexec.store import Store
from pyexec.store.consul import ConsulStore
from pyexec.store.memory import MemoryStore

CONSUL_ADDR = os.environ.get("PYEXEC_TEST_CONSUL_ADDR", "127.0.0.1:8500")


def consul_url(addr: str = CONSUL_ADDR) -> str:
    return addr if "://" in addr else f"http://{addr}"


def new_prefix() -> str:
    return f"pyexec-test-{secrets.token_hex(6)}"


def kv_keys(prefix: str, addr: str = CONSUL_ADDR) -> list[str]:
    """Every key under ``prefix`` (sorted), read straight from Consul."""
    response = httpx.get(f"{consul_url(addr)}/v1/kv/{prefix}/", params={"keys": ""})
    if response.status_code == 404:
        return []
    response.raise_for_status()
    keys: list[str] = response.json()
    return sorted(keys)


def kv_raw(key: str, addr: str = CONSUL_ADDR) -> bytes | None:
    response = httpx.get(f"{consul_url(addr)}/v1/kv/{key}", params={"raw": ""})
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.content


def kv_put(key: str, value: bytes, addr: str = CONSUL_ADDR) -> None:
    httpx.put(f"{consul_url(addr)}/v1/kv/{key}", content=value).raise_for_status()


def kv_delete(key: str, addr: str = CONSUL_ADDR) -> None:
    httpx.delete(f"{consul_url(addr)}/v1/kv/{key}").raise_for_status()


def kv_delete_tree(prefix: str, addr: str = CONSUL_ADDR) -> None:
    httpx.delete(f"{consul_url(addr)}/v1/kv/{prefix}/", params={"recurse": ""}).raise_for_status()


def consul_settings_for(prefix: str, addr: str = CONSUL_ADDR, **overrides: Any) -> Settings:
    return Settings(consul_addr=addr, consul_prefix=prefix, **overrides)


@pytest.fixture
def consul_prefix() -> Iterator[str]:
    """A fresh KV prefix, removed after the test."""
    prefix = new_prefix()
    try:
        yield prefix
    finally:
        with contextlib.suppress(httpx.HTTPError):
            kv_delete_tree(prefix)


@pytest.fixture
def consul_settings(consul_prefix: str) -> Settings:
    return consul_settings_for(consul_prefix)


@pytest.fixture
async def consul_store(consul_settings: Settings) -> AsyncIterator[ConsulStore]:
    store = ConsulStore.from_settings(consul_settings)
    try:
        yield store
    finally:
        await store.aclose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class RecordingTransport(httpx.AsyncBaseTransport):
    """A real HTTP transport that remembers each request (method, path, query, body)."""

    inner: httpx.AsyncBaseTransport = attrs.field(factory=httpx.AsyncHTTPTransport)
    requests: list[httpx.Request] = attrs.field(factory=list)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def txns(self) -> list[list[dict[str, Any]]]:
        """The operations of every ``/v1/txn`` sent, in order."""
        return [json.loads(r.content) for r in self.requests if r.url.path == "/v1/txn"]


class ConsulServer:
    """A private single-node Consul *server* on free loopback ports, with a data dir.

    Unlike ``-dev`` (memory only), its KV survives a kill and restart, so a test can
    stop Consul in the middle of a write and look at what really stayed behind.
    """

    def __init__(self, *, tls: bool = False) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="pyexec-consul-")
        self.http_port = free_port()
        self.ports = [free_port() for _ in range(3)]  # server, serf lan, serf wan
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.data_dir, "agent.log")
        self.https_port: int | None = None
        self.extra: list[str] = []
        if tls:
            self._make_tls()

    def tls_file(self, name: str) -> str:
        """``ca``, ``client`` or ``client-key``: PEM files made by ``consul tls``."""
        files = {
            "ca": "consul-agent-ca.pem",
            "client": "dc1-client-consul-0.pem",
            "client-key": "dc1-client-consul-0-key.pem",
        }
        return os.path.join(self.data_dir, files[name])

    def _make_tls(self) -> None:
        """A private CA, a server cert (SANs localhost, 127.0.0.1) and a client cert; an
        https port that demands client certificates."""
        for args in (
            ["ca", "create"],
            ["cert", "create", "-server"],
            ["cert", "create", "-client"],
        ):
            subprocess.run(
                ["consul", "tls", *args], cwd=self.data_dir, check=True, capture_output=True
            )
        self.https_port = free_port()
        d = self.data_dir
        self.extra = [
            "-hcl", f"ports {{ https = {self.https_port} }}",
            "-hcl", f'ca_file = "{d}/consul-agent-ca.pem"',
            "-hcl", f'cert_file = "{d}/dc1-server-consul-0.pem"',
            "-hcl", f'key_file = "{d}/dc1-server-consul-0-key.pem"',
            "-hcl", "verify_incoming_https = true",
        ]  # fmt: skip

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:
        server, lan, wan = self.ports
        argv = [
            "consul", "agent", "-server", "-bootstrap-expect=1", "-node=pyexec-test",
            f"-data-dir={self.data_dir}/data", "-bind=127.0.0.1", "-client=127.0.0.1",
            f"-http-port={self.http_port}", "-dns-port=-1", "-grpc-port=-1",
            f"-server-port={server}", f"-serf-lan-port={lan}", f"-serf-wan-port={wan}",
            "-log-level=warn", "-hcl", "performance { raft_multiplier = 1 }",
            "-hcl", "disable_update_check = true", *self.extra,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"consul exited early; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                leader = httpx.get(f"http://{self.addr}/v1/status/leader", timeout=1).json()
                # A leader alone is not enough: KV writes also need the server's own
                # raft configuration to be committed, which a first write proves.
                if (
                    leader
                    and httpx.put(
                        f"http://{self.addr}/v1/kv/ready", content=b"1", timeout=2
                    ).is_success
                ):
                    return
            time.sleep(0.1)  # bounded readiness poll: the agent offers nothing to wait on
        raise RuntimeError(f"consul did not become ready in {timeout} s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL: no graceful leave, like a crashed or partitioned agent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def consul_server() -> Iterator[ConsulServer]:
    """A private, restartable Consul server (slow: about 5-10 s per start)."""
    if shutil.which("consul") is None:
        pytest.skip("the consul binary is not on PATH (scripts/bootstrap.sh --consul)")
    server = ConsulServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def consul_tls_server() -> Iterator[ConsulServer]:
    """A private Consul server with an https port that requires client certificates."""
    if shutil.which("consul") is None:
        pytest.skip("the consul binary is not on PATH (scripts/bootstrap.sh --consul)")
    server = ConsulServer(tls=True)
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(params=["memory", pytest.param("consul", marks=pytest.mark.consul)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each store backend in turn (the Consul one needs ``consul_settings`` in scope)."""
    backend: Store
    if request.param == "consul":
        backend = ConsulStore.from_settings(request.getfixturevalue("consul_settings"))
    else:
        backend = MemoryStore()
    try:
        yield backend
    finally:
        await backend.aclose()
