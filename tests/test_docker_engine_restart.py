"""Fault test: the Docker engine restarted with a run in flight. The service must give
that run a clear verdict and go on serving new runs.

The shared engine of the machine is never touched: the test starts a dockerd of its own
(own socket, data-root, exec-root, pidfile, and its own bridge, so it leaves the
machine's ``docker0`` alone; no iptables changes) and loads the runner image into it
with ``docker save | docker load``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import TEST_IMAGE, app_client, make_settings
from .tarfiles import make_tar

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


class OwnDockerd:
    """A dockerd this test starts, restarts and stops itself."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = f"unix://{root}/docker.sock"
        self.bridge = f"pyx-{secrets.token_hex(3)}"
        (root / "daemon.json").write_text("{}\n")
        self.argv = [
            "dockerd",
            f"--host={self.socket}",
            f"--data-root={root}/data",
            f"--exec-root={root}/exec",
            f"--pidfile={root}/docker.pid",
            f"--config-file={root}/daemon.json",
            # Its own bridge: `--bridge none` would delete the machine's docker0.
            f"--bridge={self.bridge}",
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--shutdown-timeout=5",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.root / "dockerd.log").open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:  # bounded readiness poll: dockerd offers nothing to wait on
            assert self.proc.poll() is None, (self.root / "dockerd.log").read_text()[-2000:]
            with (
                contextlib.suppress(httpx.TransportError),
                httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(self.root / "docker.sock"))
                ) as ping,
            ):
                if ping.get("http://dockerd/_ping", timeout=5).status_code == 200:
                    return
            assert time.monotonic() < deadline, "the test's dockerd did not come up"
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


@pytest.fixture
def own_dockerd() -> Iterator[OwnDockerd]:
    if shutil.which("dockerd") is None or shutil.which("ip") is None:
        pytest.skip("needs dockerd and iproute2 (scripts/bootstrap.sh installs both)")
    root = Path(tempfile.mkdtemp(prefix="pyx-d-", dir="/tmp"))  # short: socket paths
    daemon = OwnDockerd(root)
    subprocess.run(["ip", "link", "add", daemon.bridge, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.213.7.1/24", "dev", daemon.bridge], check=True)
        daemon.start()
        save = subprocess.Popen(["docker", "save", TEST_IMAGE], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "-H", daemon.socket, "load", "-q"],
            stdin=save.stdout,
            check=True,
            capture_output=True,
            timeout=300,
        )
        assert save.stdout is not None
        save.stdout.close()
        assert save.wait(60) == 0
        yield daemon
    finally:
        daemon.stop()
        subprocess.run(["ip", "link", "del", daemon.bridge], check=False)
        shutil.rmtree(root, ignore_errors=True)


def upload(code: str, config: dict[str, int]) -> dict[str, object]:
    return {
        "files": {"tar": ("code.tar", make_tar({"main.py": code}), "application/x-tar")},
        "data": {"metadata": json.dumps({"config": config})},
    }


# When the engine goes away under it, docker-py drops a pooled connection to the old
# socket without closing it (garbage-collected later, with a ResourceWarning).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_engine_restart_ends_runs_clearly_and_new_runs_work(own_dockerd: OwnDockerd) -> None:
    """dockerd restarted under a running execution: that execution ends failed/error,
    saying the sandbox was stopped, within a bound; afterwards runs work again."""
    settings = make_settings(docker_host=own_dockerd.socket)
    async with app_client(settings) as api:
        sleeper = "print('up', flush=True)\nimport time\ntime.sleep(120)\n"
        accepted = await api.post("/api/v1/exec/async", **upload(sleeper, {"timeout_seconds": 60}))
        assert accepted.status_code == 202, accepted.text
        execution_id = accepted.json()["execution_id"]
        deadline = time.monotonic() + 60
        while (await api.get(f"/api/v1/executions/{execution_id}/logs")).json()["stdout"] != "up\n":
            assert time.monotonic() < deadline, "the program never started"
            await _tick()

        own_dockerd.stop()
        own_dockerd.start()

        ended = (await api.get(f"/api/v1/executions/{execution_id}", params={"wait": 60})).json()
        assert (ended["status"], ended["reason"]) == ("failed", "error"), ended
        assert ended["error"], ended
        assert ended["stdout"] == "up\n", (ended["error"], ended["exit_code"])

        hello = await api.post(
            "/api/v1/exec/sync", **upload("print('hello again')", {"timeout_seconds": 30})
        )
        record = hello.json()
        assert (record["reason"], record["stdout"]) == ("exited", "hello again\n"), record
        health = (await api.get("/health")).json()
        assert health["checks"]["runner"] == "ok", health


async def _tick() -> None:
    import anyio

    await anyio.sleep(0.1)  # bounded status poll; the API offers a wait only for the end


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_engine_restart_empties_the_warm_pool_and_it_refills(
    own_dockerd: OwnDockerd,
) -> None:
    """dockerd restarted: the pooled sandboxes die with it and are never handed out;
    once it is back the pool refills by itself with new ones and serves runs; shutdown
    leaves no pooled sandbox in that engine."""
    import docker

    settings = make_settings(docker_host=own_dockerd.socket, pool_size=2)
    image = settings.default_image
    async with app_client(settings) as api:
        pool = api.app.state.pool  # type: ignore[attr-defined]

        async def ready() -> int:
            health = (await api.get("/health")).json()
            count: int = health.get("pool", {}).get("ready", {}).get(image, 0)
            return count

        deadline = time.monotonic() + 60
        while await ready() < 2:
            assert time.monotonic() < deadline, "the pool never filled"
            await _tick()
        before = pool.ready_containers()

        own_dockerd.stop()
        deadline = time.monotonic() + 60
        while await ready() > 0:
            assert time.monotonic() < deadline, "the pool kept sandboxes of a stopped engine"
            await _tick()
        own_dockerd.start()
        deadline = time.monotonic() + 60
        while len(pool.ready_containers() - before) < 2:
            assert time.monotonic() < deadline, "the pool did not refill after the restart"
            await _tick()

        hello = await api.post("/api/v1/exec/sync", **upload("print('pooled')", {}))
        assert (hello.json()["reason"], hello.json()["stdout"]) == ("exited", "pooled\n")
        assert set(pool.served).isdisjoint(before)
        metrics = (await api.get("/metrics")).text
        assert f'pyexec_pool_hits_total{{image="{image}"}} 1.0' in metrics
        assert 'code="runner_unavailable"' in metrics
    client = docker.DockerClient(base_url=own_dockerd.socket)
    try:
        assert client.containers.list(all=True, filters={"label": "pyexec.pool=1"}) == []
    finally:
        client.close()
