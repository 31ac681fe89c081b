"""The Nomad backend end to end: the API, NomadRunner, the runner job's tasks, Consul.

Runs against nomadsim (tests/nomadsim, real Docker containers) by default, and unchanged
against a real agent when PYEXEC_TEST_NOMAD_ADDR is set (PYEXEC_TEST_CONSUL_ADDR names
the Consul the service uses, PYEXEC_TEST_NOMAD_CONSUL_ADDR the one the tasks reach);
tests of the double's fault switches skip there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyexec.cli import run_cli
from pyexec.models import Status, new_execution_id
from pyexec.runner import nomad_job
from pyexec.settings import Settings
from pyexec.store.consul import ConsulStore

from .conftest import CA_BUNDLE, app_client, make_settings
from .fakes import replace_record
from .fixtures_consul import CONSUL_ADDR, consul_url, kv_delete_tree, kv_raw, new_prefix
from .nomadsim import NomadSim
from .tarfiles import make_tar, symlink_tar

REAL_NOMAD = os.environ.get("PYEXEC_TEST_NOMAD_ADDR")
SECCOMP_PROFILE = Path(__file__).resolve().parent.parent / "pyexec" / "sandbox" / "seccomp.json"
TASK_CONSUL = os.environ.get("PYEXEC_TEST_NOMAD_CONSUL_ADDR") or consul_url(CONSUL_ADDR)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.nomad,
    pytest.mark.consul,
    pytest.mark.docker,
    # The double's docker SDK drops attach streams on unix sockets for the GC to close;
    # nothing here opens a unix socket itself.
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <socket.socket \[closed\] fd=\d+, family=1"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]


@pytest.fixture(scope="module")
def sim() -> Iterator[NomadSim | None]:
    if REAL_NOMAD:
        yield None
        return
    double = NomadSim(consul_addr=CONSUL_ADDR, heartbeat_s=1.0)
    double.start()
    try:
        yield double
    finally:
        double.stop()


@pytest.fixture
def only_sim(sim: NomadSim | None) -> NomadSim:
    if sim is None:
        pytest.skip("needs a fault switch of the double; a real agent has none")
    return sim


@pytest.fixture(scope="module")
def job_prefix(sim: NomadSim | None) -> Iterator[str]:
    """Runner jobs of this module get their own names; purged afterwards on a real agent."""
    prefix = f"pyexec-test-{secrets.token_hex(3)}"
    yield prefix
    if REAL_NOMAD:
        with httpx.Client(base_url=REAL_NOMAD, timeout=30) as nomad:
            for stub in nomad.get("/v1/jobs", params={"prefix": prefix}).json():
                nomad.delete(f"/v1/job/{stub['ID']}", params={"purge": "true"})


@pytest.fixture
def settings(sim: NomadSim | None, job_prefix: str) -> Iterator[Settings]:
    prefix = new_prefix()
    yield make_settings(
        nomad_addr=REAL_NOMAD or (sim.address if sim else None),
        consul_addr=CONSUL_ADDR,
        consul_prefix=prefix,
        nomad_consul_addr=TASK_CONSUL,
        # The jobs read this test's Consul prefix, and the service never overwrites a
        # registered job: each test registers its own.
        nomad_job_prefix=f"{job_prefix}-{secrets.token_hex(2)}",
        nomad_placement_timeout=60.0,
        # The agent is on this machine: the profile's path here is its path on the client.
        nomad_seccomp_profile=str(SECCOMP_PROFILE),
        setup_network=True,  # requirements_txt installs need it
    )
    with contextlib.suppress(httpx.HTTPError):
        kv_delete_tree(prefix)


@contextlib.asynccontextmanager
async def pyexec_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(settings) as client:
        yield client


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with pyexec_api(settings) as client:
        yield client


def program(code: str, **metadata: Any) -> dict[str, Any]:
    return {
        "files": {"tar": ("bundle.tar", make_tar({"main.py": code}), "application/x-tar")},
        "data": {"metadata": json.dumps(metadata)},
    }


async def run_sync(api: httpx.AsyncClient, code: str, **metadata: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/exec/sync", **program(code, **metadata))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def submit(api: httpx.AsyncClient, code: str, **metadata: Any) -> str:
    response = await api.post("/api/v1/exec/async", **program(code, **metadata))
    assert response.status_code == 202, response.text
    execution_id: str = response.json()["execution_id"]
    return execution_id


async def final(api: httpx.AsyncClient, execution_id: str, timeout: float = 120) -> dict[str, Any]:
    """Long-poll until the execution is terminal (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await api.get(f"/api/v1/executions/{execution_id}", params={"wait": 30})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] in {"completed", "failed", "killed"}:
            return body
    raise AssertionError(f"{execution_id} did not finish within {timeout} s")


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    """Poll ``check`` until it holds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.2)


def nomad(settings: Settings) -> httpx.Client:
    assert settings.nomad_addr
    return httpx.Client(base_url=settings.nomad_addr, timeout=30)


def children_of(settings: Settings, execution_id: str) -> list[dict[str, Any]]:
    """Dispatched runner jobs that carry ``execution_id``."""
    with nomad(settings) as client:
        stubs = client.get(
            "/v1/jobs", params={"prefix": settings.nomad_job_prefix, "meta": "true"}
        ).json()
    return [s for s in stubs if (s.get("Meta") or {}).get("execution_id") == execution_id]


# --- runs through the API ------------------------------------------------------------------


async def test_sync_run_returns_output_exit_code_and_timings(api: httpx.AsyncClient) -> None:
    """A sync run gets stdin, env and args, and returns stdout, stderr and the exit code."""
    code = (
        "import os, sys\n"
        "print('in:', sys.stdin.read(), 'env:', os.environ['GREETING'], 'args:', sys.argv[1:])\n"
        "print('oops', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    body = await run_sync(
        api, code, stdin="hello", env_vars=["GREETING=hi"], script_args=["a", "b c"]
    )
    assert body["status"] == "completed", (body["error"], body["stderr"])
    assert body["reason"] == "exited"
    assert body["exit_code"] == 3
    assert body["stdout"] == "in: hello env: hi args: ['a', 'b c']\n"
    assert body["stderr"] == "oops\n"
    assert body["started_at"] is not None
    assert body["duration_ms"] >= 0


async def test_sandbox_has_no_network_and_runs_as_uid_1000(api: httpx.AsyncClient) -> None:
    """The run task sees only the loopback interface, runs as uid 1000, on a read-only root."""
    code = (
        "import os\n"
        "root = [m.split()[3] for m in open('/proc/self/mounts') if m.split()[1] == '/']\n"
        "print(sorted(os.listdir('/sys/class/net')), os.getuid(), root[0].split(',')[0])\n"
        "open('/work/scratch', 'w').write('ok')\n"
    )
    body = await run_sync(api, code)
    assert body["stdout"] == "['lo'] 1000 ro\n", (body["error"], body["stderr"])


async def test_the_run_task_has_the_sandboxs_seccomp_profile(api: httpx.AsyncClient) -> None:
    """ptrace and personality are refused in the run task (the project's profile), as in the
    local runner; Docker's default profile would allow both."""
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.ptrace(0, 0, 0, 0), os.strerror(ctypes.get_errno()))\n"
        "print(libc.personality(0xffffffff), os.strerror(ctypes.get_errno()))\n"
    )
    body = await run_sync(api, code)
    assert body["stdout"] == ("-1 Operation not permitted\n-1 Operation not permitted\n"), (
        body["error"],
        body["stderr"],
    )


async def test_the_run_task_runs_under_runsc_when_configured(settings: Settings) -> None:
    """PYEXEC_DOCKER_RUNTIME=runsc puts the run task under gVisor (its own kernel), and the
    task's code works there (it starts no threads: runsc on ptrace cannot, here)."""
    import platform

    import attrs
    import docker

    engine = docker.from_env()
    try:
        runtimes = engine.info().get("Runtimes") or {}
    finally:
        engine.close()
    if "runsc" not in runtimes:
        pytest.skip("runsc is not registered with Docker here (scripts/bootstrap.sh does it)")
    gvisor = attrs.evolve(settings, docker_runtime="runsc")
    code = "import platform, sys\nprint(platform.release())\nprint(sys.stdin.read())\n"
    async with pyexec_api(gvisor) as api:
        body = await run_sync(api, code, stdin="fed")
    assert body["status"] == "completed", (body["error"], body["stderr"])
    release, fed = body["stdout"].splitlines()
    assert (release != platform.release(), fed) == (True, "fed")


async def test_async_run_and_logs(api: httpx.AsyncClient) -> None:
    """An async run answers 202 at once; GET ?wait returns the record once terminal."""
    execution_id = await submit(api, "print('async ok')")
    body = await final(api, execution_id)
    assert (body["status"], body["stdout"]) == ("completed", "async ok\n")
    logs = (await api.get(f"/api/v1/executions/{execution_id}/logs")).json()
    assert logs["stdout"] == "async ok\n"


async def test_large_output_is_kept_whole(api: httpx.AsyncClient) -> None:
    """Output larger than a Consul value is stored in chunks and comes back whole."""
    body = await run_sync(api, "print('x' * 700_000)")
    assert body["stdout"] == "x" * 700_000 + "\n"


async def test_kill_while_running(api: httpx.AsyncClient, settings: Settings) -> None:
    """DELETE stops the dispatched job; the record says killed, and stays killed."""
    execution_id = await submit(api, "import time\nprint('started', flush=True)\ntime.sleep(120)\n")

    async def running() -> bool:
        record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
        return bool(record["status"] == "running")

    await eventually(running)
    killed = (await api.delete(f"/api/v1/executions/{execution_id}")).json()
    assert killed["status"] == "killed"
    (child,) = children_of(settings, execution_id)

    def stopped() -> bool:
        with nomad(settings) as client:
            allocs = client.get(f"/v1/job/{child['ID']}/allocations").json()
        return bool(allocs) and all(a["ClientStatus"] != "running" for a in allocs)

    await eventually(lambda: asyncio.to_thread(stopped))
    body = await final(api, execution_id)
    assert body["status"] == "killed"
    again = (await api.delete(f"/api/v1/executions/{execution_id}")).json()
    assert again["status"] == "killed"


async def test_timeout_inside_the_task(api: httpx.AsyncClient) -> None:
    """A run past its timeout is stopped by the task and reported as timeout."""
    body = await run_sync(
        api,
        "import time\nprint('before', flush=True)\ntime.sleep(60)\n",
        config={"timeout_seconds": 2},
    )
    assert (body["status"], body["reason"]) == ("failed", "timeout")
    assert body["stdout"] == "before\n"
    assert body["duration_ms"] < 30_000


async def test_out_of_memory(api: httpx.AsyncClient) -> None:
    """A run that exceeds the class's memory is reported as oom, not as exit 137."""
    body = await run_sync(api, "x = b'1' * (1536 * 1024 ** 2)\nprint(len(x))\n")
    assert (body["status"], body["reason"]) == ("failed", "oom")


async def test_output_limit(api: httpx.AsyncClient) -> None:
    """Output beyond max_output_bytes ends the run with output_limit and truncated output."""
    body = await run_sync(
        api,
        "import sys\nfor _ in range(1000):\n    sys.stdout.write('y' * 1000)\n",
        config={"max_output_bytes": 5000},
    )
    assert (body["status"], body["reason"]) == ("failed", "output_limit")
    assert body["output_truncated"] is True
    assert body["stdout"] == "y" * 5000


async def test_setup_failure(api: httpx.AsyncClient) -> None:
    """A failing pre-command fails the run as setup_failed, with its output."""
    body = await run_sync(api, "print('never')", pre_commands=["echo preparing; exit 3"])
    assert (body["status"], body["reason"]) == ("failed", "setup_failed")
    assert "exit code 3" in body["error"]
    assert "preparing" in body["stderr"]
    assert body["stdout"] == ""


async def test_pre_commands_prepare_the_files(api: httpx.AsyncClient) -> None:
    """Pre-commands run in the bundle's directory before the entrypoint."""
    body = await run_sync(
        api, "print(open('made.txt').read())", pre_commands=["echo prepared > made.txt"]
    )
    assert body["stdout"] == "prepared\n\n"


async def test_an_in_tree_symlink_behaves_as_on_docker(api: httpx.AsyncClient) -> None:
    """The same tar with an in-tree symlink runs the same on Nomad as on the local Docker
    runner (both apply the API's tar rules while unpacking)."""
    upload = {
        "files": {"tar": ("bundle.tar", symlink_tar(), "application/x-tar")},
        "data": {"metadata": "{}"},
    }
    on_nomad = (await api.post("/api/v1/exec/sync", **upload)).json()
    async with app_client(make_settings()) as local:
        on_docker = (await local.post("/api/v1/exec/sync", **upload)).json()
    seen = [(b["status"], b["exit_code"], b["stdout"]) for b in (on_nomad, on_docker)]
    assert seen == [("completed", 0, "through the link\n")] * 2, (on_nomad, on_docker)


@pytest.mark.parametrize(
    ("config", "code"),
    [
        ({"network_disabled": False}, "network_unavailable"),
        ({"cpu_shares": 512}, "cpu_shares_unsupported"),
    ],
)
async def test_what_the_runner_cannot_honour_is_a_clear_400(
    settings: Settings, config: dict[str, Any], code: str
) -> None:
    """Network (even where the server allows it) and a CPU weight are refused at submit
    with their code, never dropped silently; nothing is dispatched."""
    import attrs

    async with pyexec_api(attrs.evolve(settings, allow_network=True)) as api:
        response = await api.post("/api/v1/exec/sync", **program("print(1)", config=config))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    with nomad(settings) as client:
        assert (
            client.get("/v1/jobs", params={"prefix": f"{settings.nomad_job_prefix}-small/"}).json()
            == []
        )


async def test_no_class_fits_is_a_clear_400(api: httpx.AsyncClient) -> None:
    """A request no resource class can hold is refused with no_resource_class."""
    response = await api.post(
        "/api/v1/exec/sync", **program("print(1)", config={"pids_limit": 1000})
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "no_resource_class"


@pytest.mark.network
async def test_requirements_are_installed(settings: Settings) -> None:
    """requirements_txt is installed by the setup task (through the CA bundle setting)."""
    import attrs

    with_ca = attrs.evolve(settings, ca_bundle=CA_BUNDLE)
    async with pyexec_api(with_ca) as api:
        body = await run_sync(api, "import six\nprint(six.__name__)\n", requirements_txt="six\n")
    assert (body["status"], body["stdout"]) == ("completed", "six\n"), body


@contextlib.contextmanager
def tcp_forwarder(listen_host: str, upstream: tuple[str, int]) -> Iterator[int]:
    """Forward TCP connections from ``listen_host`` (an ephemeral port) to ``upstream``."""
    import selectors
    import socket
    import socketserver
    import threading

    class Pipe(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with (
                socket.create_connection(upstream, timeout=10) as far,
                selectors.DefaultSelector() as sel,
            ):
                sel.register(self.request, selectors.EVENT_READ, far)
                sel.register(far, selectors.EVENT_READ, self.request)
                while events := sel.select(timeout=60):  # an idle minute ends it
                    for key, _ in events:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        block_on_close = False

    with Server((listen_host, 0), Pipe) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield int(server.server_address[1])
        finally:
            server.shutdown()
            thread.join(timeout=10)


@pytest.fixture
def node_consul() -> Iterator[str]:
    """Consul at an address a container on Docker's default bridge reaches (not loopback):
    a forwarder on the bridge gateway when the tasks' Consul is on loopback."""
    if nomad_job.task_network_mode(Settings(nomad_consul_addr=TASK_CONSUL)) == "bridge":
        yield TASK_CONSUL
        return
    import docker

    client = docker.DockerClient()
    try:
        ipam = client.networks.get("bridge").attrs["IPAM"]["Config"][0]
    finally:
        client.close()
    # Docker leaves Gateway out when it picked the default: the subnet's first address.
    gateway = ipam.get("Gateway") or str(ipaddress.ip_network(ipam["Subnet"])[1])
    consul = httpx.URL(consul_url(CONSUL_ADDR))
    with tcp_forwarder(gateway, (consul.host, consul.port or 8500)) as port:
        yield f"http://{gateway}:{port}"


async def test_pre_commands_have_no_network_even_with_consul_on_a_node_address(
    settings: Settings, node_consul: str
) -> None:
    """With PYEXEC_SETUP_NETWORK off (the default), pre-commands run in the run task: no
    network at all, not even the node's loopback (the trusted tasks, which do talk to
    Consul, are the only ones on Docker's bridge)."""
    import attrs

    consul = httpx.URL(consul_url(CONSUL_ADDR))
    probe = (
        "import os, socket\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {consul.port or 8500}), 2).close()\n"
        "    print('loopback reached')\n"
        "except OSError:\n"
        "    print('loopback blocked')\n"
        "print(sorted(os.listdir('/sys/class/net')))\n"
    )
    bridged = attrs.evolve(
        settings,
        nomad_consul_addr=node_consul,
        nomad_job_prefix=f"{settings.nomad_job_prefix}-br",
        setup_network=False,
    )
    job = nomad_job.runner_job(bridged, bridged.nomad_resource_classes[0])
    modes = {t["Name"]: t["Config"]["network_mode"] for t in job["TaskGroups"][0]["Tasks"]}
    assert modes == {"run": "none", "finish": "bridge"}
    files = {"main.py": "print(open('probe.txt').read(), end='')\n", "probe.py": probe}
    async with pyexec_api(bridged) as api:
        response = await api.post(
            "/api/v1/exec/sync",
            files={"tar": ("bundle.tar", make_tar(files), "application/x-tar")},
            data={"metadata": json.dumps({"pre_commands": ["python3 probe.py > probe.txt"]})},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "completed", body
    assert body["stdout"] == "loopback blocked\n['lo']\n", body


async def test_with_setup_network_only_the_pre_commands_get_the_network(
    settings: Settings,
) -> None:
    """PYEXEC_SETUP_NETWORK=true: the pre-commands run in the setup task, which has an
    interface besides lo (its own bridge namespace: not the node's loopback, no outside
    address contacted), and the program then sees only lo, in the files they left.
    The registered -setup job says the same: only the setup task of the request's image
    has a network, and it is never host."""
    import attrs

    assert settings.setup_network
    consul = httpx.URL(consul_url(CONSUL_ADDR))
    probe = (
        "import os, socket, sys\n"
        "nets = sorted(os.listdir('/sys/class/net'))\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {consul.port or 8500}), 2).close()\n"
        "    reached = 'loopback reached'\n"
        "except OSError:\n"
        "    reached = 'loopback blocked'\n"
        "open('probe.txt', 'w').write(f'{reached} {len(nets) > 1}\\n')\n"
        "sys.exit(0 if [n for n in nets if n != 'lo'] else 7)\n"
    )
    main = (
        "import os\n"
        "print(open('probe.txt').read(), end='')\n"
        "print(sorted(os.listdir('/sys/class/net')))\n"
    )
    opted = attrs.evolve(settings, nomad_job_prefix=f"{settings.nomad_job_prefix}-net")
    files = {"main.py": main, "probe.py": probe}
    async with pyexec_api(opted) as api:
        response = await api.post(
            "/api/v1/exec/async",
            files={"tar": ("bundle.tar", make_tar(files), "application/x-tar")},
            data={"metadata": json.dumps({"pre_commands": ["python3 probe.py"]})},
        )
        assert response.status_code == 202, response.text
        execution_id = response.json()["execution_id"]
        body = await final(api, execution_id)
    assert body["status"] == "completed", body
    assert body["stdout"] == "loopback blocked True\n['lo']\n", body
    (child,) = children_of(opted, execution_id)
    assert child["ParentID"] == f"{opted.nomad_job_prefix}-small-setup"
    with nomad(opted) as client:
        registered = client.get(f"/v1/job/{child['ParentID']}").json()
    tasks = registered["TaskGroups"][0]["Tasks"]
    from_request = {
        t["Name"]: t["Config"]["network_mode"]
        for t in tasks
        if "NOMAD_META" in t["Config"]["image"]
    }
    assert from_request == {"setup": "bridge", "run": "none"}
    for job_id in (f"{opted.nomad_job_prefix}-small", f"{opted.nomad_job_prefix}-small-pip"):
        with nomad(opted) as client:
            plain = client.get(f"/v1/job/{job_id}").json()
        for task in plain["TaskGroups"][0]["Tasks"]:
            if "NOMAD_META" in task["Config"]["image"]:
                assert (task["Name"], task["Config"]["network_mode"]) == ("run", "none")


# --- service restart, direct dispatch ----------------------------------------------------------


async def test_restart_mid_flight_loses_nothing_and_runs_nothing_twice(
    settings: Settings,
) -> None:
    """A run in flight when the service stops is picked up by the next service, once."""
    async with pyexec_api(settings) as api:
        execution_id = await submit(
            api, "import time\nprint('begin', flush=True)\ntime.sleep(4)\nprint('end')\n"
        )

        async def dispatched() -> bool:
            return bool(children_of(settings, execution_id))

        await eventually(dispatched)
    async with pyexec_api(settings) as api:
        body = await final(api, execution_id)
    assert (body["status"], body["stdout"]) == ("completed", "begin\nend\n")
    assert len(children_of(settings, execution_id)) == 1


def dispatch_directly(settings: Settings, execution_id: str) -> str:
    """What an operator's `nomad job dispatch -meta execution_id=...` sends."""
    with nomad(settings) as client:
        response = client.post(
            f"/v1/job/{settings.nomad_job_prefix}-small/dispatch",
            json={"Meta": {"execution_id": execution_id, "image": settings.default_image}},
        )
    response.raise_for_status()
    job_id: str = response.json()["DispatchedJobID"]
    return job_id


async def test_direct_dispatch_without_the_server(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    """`pyexec bundle upload` + a plain dispatch run the code; the result lands in Consul."""
    async with pyexec_api(settings):
        pass  # registers the runner jobs, as the service does at start-up
    for name, value in {
        "CONSUL_HTTP_ADDR": settings.consul_addr,
        "PYEXEC_CONSUL_PREFIX": settings.consul_prefix,
        "PYEXEC_DEFAULT_IMAGE": settings.default_image,
        "PYEXEC_DEFAULT_MEMORY_MB": str(settings.default_memory_mb),
        "PYEXEC_DEFAULT_DISK_MB": str(settings.default_disk_mb),
    }.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("NOMAD_ADDR", raising=False)
    bundle = io.BytesIO(
        make_tar(
            {
                "main.py": "import sys\nprint('direct', sys.stdin.read())\n"
                "print('z' * 40000, file=sys.stderr)\n"
            }
        )
    )
    path = tmp_path / "bundle.tar"
    path.write_bytes(bundle.getvalue())
    code = await asyncio.to_thread(
        run_cli, ["bundle", "upload", str(path), "--metadata", json.dumps({"stdin": "input"})]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    execution_id = out.strip()
    assert f"execution_id={execution_id}" in err
    await asyncio.to_thread(dispatch_directly, settings, execution_id)
    store = ConsulStore.from_settings(settings)
    try:
        record = await store.wait_terminal(execution_id, 90)
        deadline = time.monotonic() + 90
        while not record.terminal and time.monotonic() < deadline:
            record = await store.wait_terminal(execution_id, 30)
    finally:
        await store.aclose()
    assert record.status is Status.COMPLETED
    assert record.stdout == "direct input\n"
    assert record.stderr == "z" * 40000 + "\n"
    folder = f"{settings.consul_prefix}/executions/{execution_id}/"
    assert kv_raw(folder + "status") == b"completed"
    # As the service's store leaves it: the status marker, and the tar freed.
    assert kv_raw(folder + "status=completed") == b""
    assert kv_raw(folder + "status=pending") is None
    assert kv_raw(folder + "manifest") is None
    async with pyexec_api(settings) as api:
        body = (await api.get(f"/api/v1/executions/{execution_id}")).json()
    assert (body["status"], body["exit_code"], body["stdout"]) == ("completed", 0, "direct input\n")


async def test_finish_never_overwrites_a_terminal_record(settings: Settings) -> None:
    """A plain dispatch of an execution already terminal runs nothing and changes nothing."""
    import attrs

    from pyexec.models import Execution, Reason, RunOutcome, parse_request

    async with pyexec_api(settings):
        pass  # registers the runner jobs
    request = parse_request({}, settings)
    record = Execution(execution_id=new_execution_id(), request=request)
    store = ConsulStore.from_settings(settings)
    try:
        await store.create(record, io.BytesIO(make_tar({"main.py": "print('ran')"})))
        killed = record.finished(RunOutcome(reason=Reason.KILLED, error="killed before it ran"))
        await replace_record(store, killed, expect={Status.PENDING})
        job_id = await asyncio.to_thread(dispatch_directly, settings, record.execution_id)

        def dead() -> bool:
            with nomad(settings) as client:
                return bool(client.get(f"/v1/job/{job_id}").json()["Status"] == "dead")

        await eventually(lambda: asyncio.to_thread(dead))
        stored = await store.get(record.execution_id)
    finally:
        await store.aclose()
    assert attrs.evolve(stored, request=None) == attrs.evolve(killed, request=None)


# --- faults (the double only) --------------------------------------------------------------------


async def test_dispatch_500_is_a_clear_502(api: httpx.AsyncClient, only_sim: NomadSim) -> None:
    """Nomad refusing a dispatch (HTTP 500) answers 502 nomad_dispatch_failed with its text."""
    only_sim.fail_dispatch("rpc error: No cluster leader")
    try:
        response = await api.post("/api/v1/exec/sync", **program("print(1)"))
    finally:
        only_sim.fail_dispatch(None)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "nomad_dispatch_failed"
    assert "No cluster leader" in error["message"]


async def test_one_transient_dispatch_failure_is_retried(
    api: httpx.AsyncClient, settings: Settings, only_sim: NomadSim
) -> None:
    """A dispatch that fails once with "No cluster leader" is retried and runs exactly once."""
    only_sim.fail_dispatch("rpc error: No cluster leader", times=1)
    try:
        body = await run_sync(api, "print('once')")
    finally:
        only_sim.fail_dispatch(None)
    assert (body["status"], body["stdout"]) == ("completed", "once\n")
    assert len(children_of(settings, body["execution_id"])) == 1


async def test_nomad_unreachable_is_503(api: httpx.AsyncClient, only_sim: NomadSim) -> None:
    """With Nomad unreachable, runs answer 503 runner_unavailable and /health says so."""
    only_sim.set_reachable(False)
    try:
        response = await api.post("/api/v1/exec/sync", **program("print(1)"))
        health = await api.get("/health")
    finally:
        only_sim.set_reachable(True)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "runner_unavailable"
    assert health.status_code == 503
    assert (await run_sync(api, "print('back')"))["stdout"] == "back\n"


async def test_unplaceable_run_fails_with_the_reason(
    settings: Settings, only_sim: NomadSim
) -> None:
    """A run that cannot be placed before the placement deadline fails with Nomad's reason."""
    import attrs

    short = attrs.evolve(settings, nomad_placement_timeout=3.0)
    only_sim.hold = True
    try:
        async with pyexec_api(short) as api:
            execution_id = await submit(api, "print('never')")

            async def waiting_reason() -> bool:
                logs = (await api.get(f"/api/v1/executions/{execution_id}/logs")).json()
                return "cannot be placed" in logs["stderr"]

            await eventually(waiting_reason, timeout=20)
            body = await final(api, execution_id, timeout=60)
    finally:
        only_sim.hold = False
    assert (body["status"], body["reason"]) == ("failed", "error")
    assert "not placed within 3 s" in body["error"]
    assert "memory" in body["error"]


async def test_job_register_cli_registers_every_class(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pyexec job register` registers one parameterized job per class (and its -pip
    variant, then the class's warm-pool job: the pool is on by default), idempotently."""
    monkeypatch.setenv("NOMAD_ADDR", str(settings.nomad_addr))
    monkeypatch.setenv("PYEXEC_NOMAD_JOB_PREFIX", settings.nomad_job_prefix)
    for _ in range(2):
        assert await asyncio.to_thread(run_cli, ["job", "register"]) == 0
    printed = capsys.readouterr().out.split()
    classes = ("small", "medium", "large")
    expected = [f"{settings.nomad_job_prefix}-{c}{pip}" for c in classes for pip in ("", "-pip")]
    pool = [f"{settings.nomad_job_prefix}-{c}-pool" for c in classes]
    assert printed == (expected + pool) * 2
    with nomad(settings) as client:
        for job_id in expected:
            job = client.get(f"/v1/job/{job_id}").json()
            assert job["ParameterizedJob"]["MetaRequired"] == ["execution_id"]
            assert job["TaskGroups"][0]["RestartPolicy"]["Attempts"] == 0
            # The request's image runs only in the run task, and never with network.
            for task in job["TaskGroups"][0]["Tasks"]:
                requested = "${NOMAD_META_image}" in task["Config"]["image"]
                assert requested == (task["Name"] == "run")
                if requested:
                    assert task["Config"]["network_mode"] == "none"


async def test_lost_allocation_fails_the_run(
    api: httpx.AsyncClient, settings: Settings, only_sim: NomadSim
) -> None:
    """A run whose node dies (allocation lost) fails with reason error; it is not re-run."""
    execution_id = await submit(api, "import time\nprint('up', flush=True)\ntime.sleep(120)\n")

    async def running() -> bool:
        record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
        return bool(record["status"] == "running")

    await eventually(running)
    (child,) = children_of(settings, execution_id)
    with nomad(settings) as client:
        (alloc,) = client.get(f"/v1/job/{child['ID']}/allocations").json()
    only_sim.lose(alloc["ID"])
    body = await final(api, execution_id)
    assert (body["status"], body["reason"]) == ("failed", "error")
    assert "lost" in body["error"]
    with nomad(settings) as client:
        assert len(client.get(f"/v1/job/{child['ID']}/allocations").json()) == 1


async def test_eval_result_survives_the_nomad_path(api: httpx.AsyncClient) -> None:
    """The eval API's result (post-processed from stderr) is what the record keeps."""
    code = "x = 6\nprint('hi')\nx * 7"
    response = await api.post("/api/v1/eval", json={"code": code, "eval_last_expr": True})
    if response.status_code == 404 and response.json()["error"]["code"] == "not_found":
        pytest.skip("POST /api/v1/eval is not routed in pyexec.api.app yet")
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["result"], body["stdout"]) == ("completed", "42", "hi\n")
    stored = (await api.get(f"/api/v1/executions/{body['execution_id']}")).json()
    assert stored["result"] == "42"
    assert "pyexec-eval-report" not in stored["stderr"]


# --- Nomad variables (a real agent only: the double renders no nomadVar) ----------------


def server_job_secrets_template() -> str:
    """The data of jobs/pyexec-server.nomad.hcl's secrets template (heredoc unwrapped)."""
    import textwrap

    from .test_deploy import SERVER_JOB, block, load_hcl

    job = block(load_hcl(SERVER_JOB), "job", "pyexec-server")
    task = block(block(job, "group", "api"), "task", "server")
    data: str = block(task, "template")["data"]
    body = data.removeprefix("<<-EOT\n").rsplit("\n", 1)[0]
    return textwrap.dedent(body) + "\n"


def run_probe(client: httpx.Client, job_id: str, template: dict[str, Any]) -> str:
    """Run a one-task batch job with ``template``; what it saw of PYEXEC_PROBE."""
    task = {
        "Name": "probe",
        "Driver": "docker",
        "User": "1000",
        "Config": {
            "image": make_settings().default_image,
            "command": "python3",
            "args": [
                "-c",
                "import os\n"
                "with open('/alloc/data/probe', 'w') as fh:\n"
                "    print(os.environ.get('PYEXEC_PROBE', 'unset'), file=fh)\n",
            ],
            "network_mode": "none",
        },
        "Templates": [template],
        "Resources": {"CPU": 100, "MemoryMB": 64},
    }
    job = {
        "ID": job_id,
        "Name": job_id,
        "Type": "batch",
        "Datacenters": ["*"],
        "TaskGroups": [
            {
                "Name": "probe",
                "Count": 1,
                "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                "Tasks": [task],
            }
        ],
    }
    client.put("/v1/jobs", json={"Job": job}).raise_for_status()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            allocs = client.get(f"/v1/job/{job_id}/allocations").json()
            if allocs and allocs[0]["ClientStatus"] in ("complete", "failed"):
                alloc_id = allocs[0]["ID"]
                assert allocs[0]["ClientStatus"] == "complete", allocs[0]["TaskStates"]
                # A file in the alloc dir, not the logs API: a log read right after the
                # task ended can come back empty on Nomad 1.6.5 (logmon ships later).
                (entry,) = client.get(
                    f"/v1/client/fs/ls/{alloc_id}", params={"path": "alloc/data"}
                ).json()
                params = {"path": "alloc/data/probe", "offset": 0, "limit": entry["Size"]}
                return client.get(f"/v1/client/fs/readat/{alloc_id}", params=params).text
            time.sleep(0.3)
        raise AssertionError(f"{job_id} did not finish (a template still waiting?)")
    finally:
        client.delete(f"/v1/job/{job_id}", params={"purge": "true"})


def test_the_service_jobs_secrets_need_no_variable(sim: NomadSim | None, job_prefix: str) -> None:
    """jobs/pyexec-server.nomad.hcl's secrets template renders nothing (the task starts)
    while its Nomad variable does not exist, and the variable's items once it does
    (nomadVar alone would block the task: "Template Missing")."""
    if sim is not None or not REAL_NOMAD:
        pytest.skip("needs a real agent: the double renders no nomadVar templates")
    template = {
        "EmbeddedTmpl": server_job_secrets_template(),
        "DestPath": "secrets/pyexec.env",
        "ChangeMode": "noop",
        "Envvars": True,
    }
    path = "nomad/jobs/pyexec-server"
    with httpx.Client(base_url=REAL_NOMAD, timeout=30) as client:
        if client.get(f"/v1/var/{path}").status_code != 404:
            pytest.skip(f"the agent already has a variable {path}; not touching it")
        assert run_probe(client, f"{job_prefix}-novar", template) == "unset\n"
        client.put(f"/v1/var/{path}", json={"Items": {"PYEXEC_PROBE": "from-var"}})
        try:
            assert run_probe(client, f"{job_prefix}-var", template) == "from-var\n"
        finally:
            client.delete(f"/v1/var/{path}")


def test_the_writers_token_template_needs_no_variable(
    settings: Settings, sim: NomadSim | None
) -> None:
    """The finish task's CONSUL_HTTP_TOKEN template renders nothing while its variable does
    not exist (the task runs, without a token) and the token once it does."""
    if sim is not None or not REAL_NOMAD:
        pytest.skip("needs a real agent: the double renders no nomadVar templates")
    import attrs

    path = f"nomad/jobs/{settings.nomad_job_prefix}-writer"
    with_var = attrs.evolve(settings, nomad_consul_token_variable=path)
    job = nomad_job.runner_job(with_var, with_var.nomad_resource_classes[0])
    (finish,) = [t for t in job["TaskGroups"][0]["Tasks"] if t["Name"] == "finish"]
    (token,) = [t for t in finish["Templates"] if t.get("Envvars")]
    template = dict(
        token, EmbeddedTmpl=token["EmbeddedTmpl"].replace("CONSUL_HTTP_TOKEN", "PYEXEC_PROBE")
    )
    with httpx.Client(base_url=REAL_NOMAD, timeout=30) as client:
        assert run_probe(client, f"{settings.nomad_job_prefix}-notoken", template) == "unset\n"
        client.put(f"/v1/var/{path}", json={"Items": {"consul_token": "t0ken"}})
        try:
            assert run_probe(client, f"{settings.nomad_job_prefix}-token", template) == "t0ken\n"
        finally:
            client.delete(f"/v1/var/{path}")
