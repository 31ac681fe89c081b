"""Fault tests of the local runner against real processes: the server killed with runs
in flight (its deadlines still hold in the sandbox, a restarted server adopts the runs
and records what really happened)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from pyexec.runner.docker_pool import served_name
from pyexec.runner.docker_spec import LABEL_EXECUTION, LABEL_NONCE

from .artifact_files import CSV, PNG_PROGRAM, png_bytes
from .conftest import TEST_IMAGE, free_port
from .fixtures_consul import CONSUL_ADDR, kv_delete_tree, new_prefix
from .fixtures_docker import docker_client, leftovers
from .tarfiles import make_tar

__all__ = ["docker_client"]  # fixtures, imported to be found by pytest

pytestmark = [pytest.mark.docker, pytest.mark.consul]

SLEEPER = "print('started', flush=True)\nimport time\ntime.sleep(45)\nprint('never')\n"
FINISHER = "import time\nprint('working', flush=True)\ntime.sleep(4)\nprint('done')\n"


class Server:
    """``pyexec serve`` as a separate process (Consul store, local Docker runner)."""

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "server.log"
        self.env = {
            **os.environ,
            "PYEXEC_HOST": "127.0.0.1",
            "PYEXEC_PORT": str(self.port),
            "CONSUL_HTTP_ADDR": CONSUL_ADDR,
            "PYEXEC_CONSUL_PREFIX": prefix,
            "PYEXEC_DEFAULT_IMAGE": TEST_IMAGE,
            "PYEXEC_PYTHON_IMAGES": f"3.11={TEST_IMAGE}",
            "PYEXEC_DEFAULT_PYTHON_VERSION": "3.11",
            "PYEXEC_DOCKER_PULL": "false",
            "PYEXEC_LOG_FORMAT": "text",
        }
        for name in ("NOMAD_ADDR", "PYEXEC_NOMAD_ADDR", "PYEXEC_API_TOKENS"):
            self.env.pop(name, None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyexec.cli", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:  # bounded readiness poll: a separate process offers nothing to wait on
            assert self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, "the server did not come up within 60 s"
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)

    def submit(
        self, code: str, timeout_seconds: int, config: dict[str, int] | None = None, **extra: Any
    ) -> str:
        config = {"timeout_seconds": timeout_seconds, **(config or {})}
        metadata = json.dumps({"entrypoint": "main.py", "config": config, **extra})
        response = httpx.post(
            f"{self.url}/api/v1/exec/async",
            files={"tar": ("code.tar", make_tar({"main.py": code}))},
            data={"metadata": metadata},
            timeout=60,
        )
        assert response.status_code in (200, 201, 202), response.text
        execution_id: str = response.json()["execution_id"]
        return execution_id

    def pool_ready(self) -> int:
        """Pooled sandboxes of the test image ready now (0 without a pool)."""
        health = httpx.get(f"{self.url}/health", timeout=10).json()
        ready: int = (health.get("pool") or {}).get("ready", {}).get(TEST_IMAGE, 0)
        return ready

    def get(self, execution_id: str, wait: float = 0) -> dict[str, Any]:
        response = httpx.get(
            f"{self.url}/api/v1/executions/{execution_id}",
            params={"wait": wait} if wait else None,
            timeout=wait + 30,
        )
        assert response.status_code == 200, response.text
        record: dict[str, Any] = response.json()
        return record


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    prefix = new_prefix()
    server = Server(tmp_path, prefix)
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)
        kv_delete_tree(prefix)


def _container(client: docker.DockerClient, execution_id: str) -> Any:
    """The run container of ``execution_id``: labelled with it, or a pooled sandbox
    named for it."""
    found = client.containers.list(all=True, filters={"label": f"{LABEL_EXECUTION}={execution_id}"})
    found += client.containers.list(all=True, filters={"name": served_name(execution_id)})
    assert len(found) == 1, found
    return found[0]


def _engine_time(value: str) -> datetime:
    head, _, fraction = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{(fraction + '000000')[:6]}+00:00")


@pytest.mark.parametrize("pool_size", ["0", "2"], ids=["cold", "pooled"])
def test_killed_server_runs_keep_their_deadline_and_are_adopted_after_restart(
    server: Server, docker_client: docker.DockerClient, pool_size: str
) -> None:
    """After `kill -9` of the server, a run with a 5 s timeout that sleeps 45 s still ends
    after about 5 s, and one that finishes meanwhile keeps its output: the restarted
    server records a timeout and an exit with the real output, not `lost`; on a fresh
    container and on a pooled sandbox alike."""
    _start_with_pool(server, pool_size)
    sleeper = server.submit(SLEEPER, timeout_seconds=5)
    finisher = server.submit(FINISHER, timeout_seconds=30)
    deadline = time.monotonic() + 60
    while {server.get(i)["status"] for i in (sleeper, finisher)} != {"running"}:
        assert time.monotonic() < deadline, "the runs never started"
        time.sleep(0.1)
    started_at = datetime.fromisoformat(server.get(sleeper)["started_at"])
    server.kill()
    pooled = docker_client.containers.list(all=True, filters={"name": served_name(sleeper)})
    assert bool(pooled) == (pool_size != "0"), pooled

    # Nobody watches the sandboxes now; the sleeper's own deadline must still end it.
    container = _container(docker_client, sleeper)
    assert container.wait(timeout=30)["StatusCode"] == 137
    container.reload()
    state = container.attrs["State"]
    # From the run's start (a pooled sandbox's container started earlier).
    ran = (_engine_time(state["FinishedAt"]) - started_at).total_seconds()
    assert 5 <= ran < 5 + 3, ran
    assert _container(docker_client, finisher).wait(timeout=30)["StatusCode"] == 0

    server.start()
    timed_out = server.get(sleeper, wait=30)
    assert (timed_out["status"], timed_out["reason"]) == ("failed", "timeout"), timed_out["error"]
    assert timed_out["stdout"] == "started\n"
    exited = server.get(finisher, wait=30)
    assert (exited["status"], exited["reason"], exited["exit_code"]) == ("completed", "exited", 0)
    assert (exited["stdout"], exited["stderr"]) == ("working\ndone\n", ""), exited
    for execution_id in (sleeper, finisher):
        assert leftovers(docker_client, execution_id) == []
        assert (
            docker_client.containers.list(all=True, filters={"name": served_name(execution_id)})
            == []
        )


def _start_with_pool(server: Server, pool_size: str) -> None:
    server.env["PYEXEC_POOL_SIZE"] = pool_size
    server.start()
    deadline = time.monotonic() + 60
    while int(pool_size) > server.pool_ready():
        assert time.monotonic() < deadline, "the pool never filled"
        time.sleep(0.1)  # bounded poll of /health: the pool fills in the background


def _wait_started(client: docker.DockerClient, execution_id: str) -> None:
    """Until the program has printed its first line (the engine's log has it)."""
    deadline = time.monotonic() + 60
    while True:
        found = client.containers.list(filters={"label": f"{LABEL_EXECUTION}={execution_id}"})
        found += client.containers.list(filters={"name": served_name(execution_id)})
        if found and b"started" in found[0].logs():
            return
        assert time.monotonic() < deadline, "the program never started"
        time.sleep(0.1)  # bounded poll: the run starts in the background


@pytest.mark.parametrize("pool_size", ["0", "2"], ids=["cold", "pooled"])
def test_a_run_adopted_after_a_restart_keeps_its_artifacts(
    server: Server, docker_client: docker.DockerClient, pool_size: str
) -> None:
    """A run asking for artifacts whose server is killed mid-run is adopted by the next
    server, which lists its files and serves them byte-exact (the mark's nonce is kept in
    the run container's label); its stdout holds the program's output only."""
    _start_with_pool(server, pool_size)
    code = "import time\nprint('started', flush=True)\ntime.sleep(3)\n" + PNG_PROGRAM
    execution_id = server.submit(code, timeout_seconds=30, artifacts=["out/*", "results/**"])
    _wait_started(docker_client, execution_id)
    server.kill()
    assert _container(docker_client, execution_id).labels[LABEL_NONCE]

    server.start()
    record = server.get(execution_id, wait=30)
    assert (record["status"], record["reason"]) == ("completed", "exited"), record["error"]
    assert record["stdout"] == "started\ndrew\n"
    assert record["artifacts_truncated"] is False
    expected = {"out/plot.png": png_bytes(), "results/2024/table.csv": CSV.encode()}
    listed = {item["path"]: (item["size"], item["sha256"]) for item in record["artifacts"]}
    assert listed == {
        path: (len(data), hashlib.sha256(data).hexdigest()) for path, data in expected.items()
    }
    for path, data in expected.items():
        got = httpx.get(f"{server.url}/api/v1/executions/{execution_id}/artifacts/{path}")
        assert (got.status_code, got.content) == (200, data)
    assert leftovers(docker_client, execution_id) == []


def _events(url: str, timeout: float) -> list[tuple[float, str, dict[str, Any]]]:
    """The events of one execution's stream, each with when it arrived (monotonic)."""
    got: list[tuple[float, str, dict[str, Any]]] = []
    kind = ""
    with httpx.stream("GET", url, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                got.append((time.monotonic(), kind, json.loads(line.removeprefix("data: "))))
                if kind == "end":
                    break
    return got


def test_a_run_adopted_after_a_restart_streams_its_output_live(
    server: Server, docker_client: docker.DockerClient
) -> None:
    """After a restart, the adopted local run's output reaches an event stream as it is
    printed (not all at its end), at the same offsets: no byte lost or repeated."""
    server.start()
    code = (
        "import time\nprint('started', flush=True)\n"
        "for i in range(30):\n    time.sleep(0.4)\n    print('tick', i, flush=True)\n"
    )
    execution_id = server.submit(code, timeout_seconds=30)
    _wait_started(docker_client, execution_id)
    server.kill()

    server.start()
    events = _events(f"{server.url}/api/v1/executions/{execution_id}/events", timeout=60)
    end = events[-1]
    assert end[1] == "end"
    record = end[2]
    assert record["reason"] == "exited", record
    expected = "started\n" + "".join(f"tick {i}\n" for i in range(30))
    assert record["stdout"] == expected
    output = [(at, data) for at, kind, data in events if kind == "stdout"]
    text = ""
    for _, data in output:
        assert data["offset"] == len(text.encode())
        text += data["text"]
    assert text == expected
    # Ticks come 0.4 s apart for 12 s (the restart takes a few): pieces read live arrive
    # spread out before the end, not in one piece at it.
    assert output[-1][0] - output[0][0] > 1.0, [(at - end[0], d["text"]) for at, d in output]


def test_a_run_adopted_after_a_restart_ends_at_its_output_limit(
    server: Server, docker_client: docker.DockerClient
) -> None:
    """An adopted run whose output passes its cap is ended then, as a watched run is,
    not left running to its deadline: ``output_limit``, the output cut to the cap."""
    server.start()
    code = (
        "import sys, time\nprint('started', flush=True)\ntime.sleep(3)\n"
        "sys.stdout.write(('x' * 99 + '\\n') * 50)\nsys.stdout.flush()\ntime.sleep(100)\n"
    )
    execution_id = server.submit(code, timeout_seconds=120, config={"max_output_bytes": 1024})
    _wait_started(docker_client, execution_id)
    server.kill()

    server.start()
    record = server.get(execution_id, wait=60)
    assert (record["status"], record["reason"]) == ("failed", "output_limit"), record
    assert record["output_truncated"] is True
    assert record["stdout"] == ("started\n" + ("x" * 99 + "\n") * 50)[:1024]
    started = datetime.fromisoformat(record["started_at"])
    finished = datetime.fromisoformat(record["finished_at"])
    assert (finished - started).total_seconds() < 60  # the program slept for 100 s
    assert leftovers(docker_client, execution_id) == []
