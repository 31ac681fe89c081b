"""Deploying and operating: job files, agent configs, dev cluster, image, shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hcl2
import httpx
import pytest
from hcl2 import SerializationOptions

from .conftest import TEST_IMAGE, free_port
from .tarfiles import make_tar

ROOT = Path(__file__).resolve().parent.parent
SERVER_JOB = ROOT / "jobs" / "pyexec-server.nomad.hcl"
PLAIN = SerializationOptions(with_comments=False, explicit_blocks=False, strip_string_quotes=True)


def load_hcl(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return hcl2.load(fh, serialization_options=PLAIN)


def block(parent: dict[str, Any], kind: str, label: str | None = None) -> dict[str, Any]:
    """The one ``kind`` block (with ``label``) under ``parent``."""
    (found,) = parent[kind]
    return found[label] if label is not None else found


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m|h)", duration)
    assert match, duration
    return int(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]


# --- Job files and agent configs ------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.nomad.hcl")), ids=lambda p: p.name)
def test_job_files_parse(path: Path) -> None:
    """Every job file in jobs/ is valid HCL2 holding exactly one job."""
    assert len(load_hcl(path)["job"]) == 1


@pytest.fixture(scope="module")
def server_group() -> dict[str, Any]:
    job = block(load_hcl(SERVER_JOB), "job", "pyexec-server")
    assert job["type"] == "service"
    return block(job, "group", "api")


def test_server_job_runs_count_replicas(server_group: dict[str, Any]) -> None:
    """The service group's count is the `count` variable, spread across nodes."""
    assert server_group["count"] == "${var.count}"
    assert block(server_group, "spread")["attribute"] == "${node.unique.id}"


def test_server_job_registers_health_checks(server_group: dict[str, Any]) -> None:
    """The Consul service checks /health (readiness) and /health/live (restarts the task)."""
    service = block(server_group, "service")
    assert service["provider"] == "consul"
    checks = {check["path"]: check for check in service["check"]}
    assert set(checks) == {"/health", "/health/live"}
    assert all(check["type"] == "http" for check in checks.values())
    assert "check_restart" not in checks["/health"]
    assert "check_restart" in checks["/health/live"]


def test_server_job_rolls_updates_and_reverts() -> None:
    """Updates go one replica at a time, gated by checks, reverting a bad deployment."""
    job = block(load_hcl(SERVER_JOB), "job", "pyexec-server")
    update = block(job, "update")
    assert update["max_parallel"] == 1
    assert update["health_check"] == "checks"
    assert update["auto_revert"] is True


def test_server_job_takes_secrets_from_a_nomad_variable(server_group: dict[str, Any]) -> None:
    """Tokens come from a Nomad variable via a template into secrets/, never as plain env."""
    task = block(server_group, "task", "server")
    env = block(task, "env")
    assert not [name for name in env if "TOKEN" in name]
    template = block(task, "template")
    assert template["env"] is True
    assert template["destination"].startswith("${NOMAD_SECRETS_DIR}/")
    # Guarded: nomadVar alone would block the task until the variable exists.
    assert 'range nomadVarList "nomad/jobs/pyexec-server"' in template["data"]
    assert 'if eq .Path "nomad/jobs/pyexec-server"' in template["data"]
    assert "with nomadVar .Path" in template["data"]
    assert 'nomadVar "' not in template["data"]
    assert "{{ .K }}={{ .V }}" in template["data"]
    assert "attr.unique.network.ip-address" in env["NOMAD_ADDR"]
    assert "attr.unique.network.ip-address" in env["CONSUL_HTTP_ADDR"]


def test_server_job_drains_within_its_kill_timeout(server_group: dict[str, Any]) -> None:
    """kill_timeout exceeds the shutdown grace and fits the dev client's max_kill_timeout."""
    task = block(server_group, "task", "server")
    grace = float(block(task, "env")["PYEXEC_SHUTDOWN_GRACE_SECONDS"])
    client = block(load_hcl(ROOT / "nomad" / "client.hcl"), "client")
    assert grace < seconds(task["kill_timeout"]) <= seconds(client["max_kill_timeout"])
    resources = block(task, "resources")
    assert resources["cpu"] > 0
    assert resources["memory"] > 0
    config = block(task, "config")
    assert config["cap_drop"] == ["all"]
    assert config["readonly_rootfs"] is True


def test_dev_client_allows_only_what_runner_jobs_need() -> None:
    """The dev client runs only docker, no privileged containers, no host bind mounts."""
    config = load_hcl(ROOT / "nomad" / "client.hcl")
    assert block(config, "client")["options"]["driver.allowlist"] == "docker"
    docker = block(block(config, "plugin", "docker"), "config")
    assert docker["allow_privileged"] is False
    assert block(docker, "volumes")["enabled"] is False
    assert block(docker, "gc")["image"] is False
    assert "net_raw" not in docker["allow_caps"]
    assert "sys_admin" not in docker["allow_caps"]
    server = block(load_hcl(ROOT / "nomad" / "server.hcl"), "server")
    assert server["bootstrap_expect"] == 1


@pytest.mark.consul
@pytest.mark.skipif(shutil.which("consul") is None, reason="the consul binary is not on PATH")
def test_consul_dev_config_validates(tmp_path: Path) -> None:
    """`consul validate` accepts nomad/consul.hcl."""
    data_dir = tmp_path / "data.hcl"
    data_dir.write_text(f'data_dir = "{tmp_path}"\n', encoding="utf-8")
    result = subprocess.run(
        ["consul", "validate", str(ROOT / "nomad" / "consul.hcl"), str(data_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dev_cluster_names_a_missing_nomad_and_starts_nothing(tmp_path: Path) -> None:
    """Without a nomad binary, dev-cluster.sh says so, exits 127 and leaves no process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "curl", "grep", "docker", "consul", "cat", "mkdir", "sleep"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    state = tmp_path / "state"
    result = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(ROOT / "scripts" / "dev-cluster.sh"), "start"],
        env={"PATH": str(bin_dir), "PYEXEC_DEV_CLUSTER_DIR": str(state)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 127
    assert "missing" in result.stderr
    assert "- nomad" in result.stderr
    assert not state.exists()


# --- The service image ----------------------------------------------------------------------

IMAGE_TAG = "pyexec:test-deploy"
SLEEPER = make_tar({"main.py": "import sys, time\ntime.sleep(float(sys.argv[1]))\nprint('done')\n"})


DEPLOY_TOKEN = "deploy-test-token"


def sync_run(url: str, seconds_: float, **kwargs: Any) -> httpx.Response:
    metadata = {"script_args": [str(seconds_)], "config": {"timeout_seconds": 60}}
    return httpx.post(
        f"{url}/api/v1/exec/sync",
        files={"tar": ("code.tar", SLEEPER, "application/x-tar")},
        data={"metadata": json.dumps(metadata)},
        timeout=120,
        **kwargs,
    )


def wait_until_live(url: str, deadline_s: float, alive: Any = None) -> None:
    """Bounded readiness poll: neither uvicorn nor Docker offers an event to wait on."""
    deadline = time.monotonic() + deadline_s
    while True:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health/live", timeout=2).status_code == 200:
                return
        if alive is not None and not alive():
            raise RuntimeError("the server exited before it became live")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become live within {deadline_s} s")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def service_image() -> str:
    """The service image, built once per session from the local runner image."""
    env = {**os.environ, "PYEXEC_BASE_IMAGE": TEST_IMAGE}
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-image.sh"), IMAGE_TAG],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return IMAGE_TAG


def docker_json(*args: str) -> Any:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(out.stdout)


@pytest.mark.docker
@pytest.mark.network  # the host fetches the pinned dependency wheels from the package index
def test_image_is_small_non_root_and_health_checked(service_image: str) -> None:
    """The image runs as uid 10001, declares a health check, and adds little to its base."""
    (info,) = docker_json("image", "inspect", service_image)
    (base,) = docker_json("image", "inspect", TEST_IMAGE)
    assert info["Config"]["User"] == "10001:10001"
    assert "/health/live" in " ".join(info["Config"]["Healthcheck"]["Test"])
    assert info["Config"]["Entrypoint"] == ["pyexec"]
    added_mb = (info["Size"] - base["Size"]) / 1e6
    print(f"service image {info['Size'] / 1e6:.0f} MB, {added_mb:.0f} MB over {TEST_IMAGE}")
    # 40 MB before the MCP SDK (pyexec serve mounts /mcp): it brings pydantic, pydantic-core,
    # jsonschema and, through pyjwt, cryptography, about 35 MB in all.
    assert added_mb < 80


@pytest.fixture
def service_container(service_image: str) -> Iterator[str]:
    """The image serving in embedded mode, as uid 10001 with the socket's group."""
    gid = os.stat("/var/run/docker.sock").st_gid
    name = f"pyexec-deploy-test-{os.getpid()}"
    subprocess.run(
        [
            "docker", "run", "-d", "--rm", "--name", name,
            "-p", "127.0.0.1::8080",
            "-v", "/var/run/docker.sock:/var/run/docker.sock",
            "--group-add", str(gid),
            "-e", f"PYEXEC_DEFAULT_IMAGE={TEST_IMAGE}",
            # The eval images, as `just serve` names them where none can be pulled (the
            # warm pool waits for images on the host, and /health says when one is empty).
            "-e", f"PYEXEC_PYTHON_IMAGES=3.11={TEST_IMAGE}",
            "-e", "PYEXEC_DEFAULT_PYTHON_VERSION=3.11",
            "-e", "PYEXEC_DEFAULT_MEMORY_MB=256",
            "-e", "PYEXEC_DEFAULT_DISK_MB=64",
            # The image binds 0.0.0.0, which pyexec serves only behind tokens.
            "-e", f"PYEXEC_API_TOKENS={DEPLOY_TOKEN}",
            service_image,
        ],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    try:
        port = subprocess.run(
            ["docker", "port", name, "8080/tcp"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()[0]  # fmt: skip
        url = f"http://{port}"
        wait_until_live(url, 60)
        yield url
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60, check=False)


@pytest.mark.docker
@pytest.mark.network  # the host fetches the pinned dependency wheels from the package index
def test_image_serves_health_and_a_sync_run(service_container: str) -> None:
    """The built image answers /health with both backends ok and runs a script end to end."""
    # Live comes first; the warm pool fills just after (bounded wait for its first sandbox).
    deadline = time.monotonic() + 60
    while True:
        health = httpx.get(f"{service_container}/health", timeout=10)
        assert health.status_code == 200, health.text
        body = health.json()
        if body["status"] == "ok" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert (body["status"], body["checks"]) == ("ok", {"store": "ok", "runner": "ok"}), body
    assert body["pool"]["empty"] == []
    assert sync_run(service_container, 0).status_code == 401
    response = sync_run(service_container, 0, headers={"Authorization": f"Bearer {DEPLOY_TOKEN}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["reason"], body["stdout"]) == ("completed", "exited", "done\n")
    assert "X-Request-ID" in response.headers
    assert httpx.get(f"{service_container}/docs/static/swagger-ui-bundle.js").status_code == 200


@pytest.mark.docker
@pytest.mark.network  # the host fetches the pinned dependency wheels from the package index
def test_image_without_tokens_refuses_to_serve_openly(service_image: str) -> None:
    """Run with no API tokens, the image (bound to 0.0.0.0) exits 2 with one line saying why."""
    done = subprocess.run(
        ["docker", "run", "--rm", "-e", f"PYEXEC_DEFAULT_IMAGE={TEST_IMAGE}", service_image],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "PYEXEC_API_TOKENS" in line
    assert "PYEXEC_ALLOW_UNAUTHENTICATED" in line


# --- Graceful shutdown of `pyexec serve` ----------------------------------------------------


@contextlib.contextmanager
def serve_process(grace: float, log: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`pyexec serve` in embedded mode on a loopback port, logging to ``log``; stopped on exit."""
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYEXEC_", "NOMAD_", "CONSUL_"))
    }
    env.update(
        PYEXEC_HOST="127.0.0.1",
        PYEXEC_PORT=str(port),
        PYEXEC_DEFAULT_IMAGE=TEST_IMAGE,
        PYEXEC_DEFAULT_MEMORY_MB="256",
        PYEXEC_DEFAULT_DISK_MB="64",
        PYEXEC_SHUTDOWN_GRACE_SECONDS=str(grace),
    )
    with log.open("w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyexec.cli", "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_live(url, 60, alive=lambda: proc.poll() is None)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


#: uvicorn re-raises the signal it caught once it has shut down, so a clean stop ends
#: "killed by SIGTERM" (143 in a shell); an error exit would be a positive code.
CLEAN_EXIT = (0, -signal.SIGTERM)


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    (line,) = [line for line in text.splitlines() if line.startswith("pyexec_executions_in_flight")]
    return float(line.split()[1])


def run_in_background(
    url: str, seconds_: float, in_flight_before: int = 0
) -> tuple[threading.Thread, dict[str, Any]]:
    """A sync run in a thread, returned once it is launched (``in_flight_before`` + 1 runs)."""
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["response"] = sync_run(url, seconds_, headers={"X-Request-ID": "drain-test"})
        except httpx.HTTPError as exc:
            result["error"] = exc
        result["at"] = time.monotonic()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    # Bounded poll of the in-flight gauge: SIGTERM must land while the run is going.
    deadline = time.monotonic() + 60
    while in_flight(url) < in_flight_before + 1:
        assert thread.is_alive(), result
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    return thread, result


def refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health/live", timeout=2)
    except httpx.ConnectError:
        return True
    return False


@pytest.mark.docker
def test_sigterm_lets_a_sync_run_finish_and_refuses_new_connections(tmp_path: Path) -> None:
    """SIGTERM: the sync run in flight completes, new connections are refused, exit 0, JSON logs."""
    log = tmp_path / "serve.log"
    with serve_process(grace=30, log=log) as (proc, url):
        thread, result = run_in_background(url, 4)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while not refused(url):
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            time.sleep(0.05)
        assert thread.is_alive(), "the run ended before the listener closed"
        thread.join(timeout=60)
        assert proc.wait(timeout=60) in CLEAN_EXIT
    body = result["response"].json()
    assert result["response"].status_code == 200, body
    assert (body["status"], body["stdout"]) == ("completed", "done\n")
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    access = [
        line
        for line in lines
        if line.get("logger") == "pyexec.http" and line.get("path") == "/api/v1/exec/sync"
    ]
    assert [line["request_id"] for line in access] == ["drain-test"]
    about_it = [line for line in lines if line.get("logger") == "pyexec.execution"]
    assert [line["status"] for line in about_it] == ["running", "completed"]
    for line in about_it:
        assert (line["execution_id"], line["request_id"]) == (body["execution_id"], "drain-test")


@pytest.mark.docker
def test_sigterm_past_the_grace_period_kills_and_records_the_run(tmp_path: Path) -> None:
    """Past the grace period local runs are killed and recorded: the sync caller gets the
    killed record, and an async run is logged as killed."""
    log = tmp_path / "serve.log"
    with serve_process(grace=1, log=log) as (proc, url):
        submitted = httpx.post(
            f"{url}/api/v1/exec/async",
            files={"tar": ("code.tar", SLEEPER, "application/x-tar")},
            data={"metadata": json.dumps({"script_args": ["30"]})},
            timeout=60,
        )
        assert submitted.status_code == 202, submitted.text
        thread, result = run_in_background(url, 30, in_flight_before=1)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=60)
        assert proc.wait(timeout=60) in CLEAN_EXIT
    response = result["response"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["reason"]) == ("killed", "killed")
    assert "shut down" in body["error"]
    assert result["at"] - signalled < 10
    finished = {
        line["execution_id"]: line
        for line in map(json.loads, log.read_text(encoding="utf-8").splitlines())
        if line.get("logger") == "pyexec.execution" and line["status"] != "running"
    }
    async_line = finished[submitted.json()["execution_id"]]
    assert (async_line["status"], async_line["reason"]) == ("killed", "killed")
    assert "shut down" in async_line["error"]
