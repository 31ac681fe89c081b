"""Artifacts on the embedded default: HTTP API → service → memory store → real Docker."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from typing import Any

import docker
import httpx
import pytest

from pyexec.runner.docker import DockerRunner
from pyexec.runner.docker_spec import LABEL_EXECUTION, LABEL_NONCE

from .artifact_files import CSV, PNG_PROGRAM, png_bytes
from .conftest import app_client, make_settings
from .fixtures_docker import docker_client, runtime_registered, start
from .tarfiles import make_tar

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

__all__ = ["docker_client"]  # a fixture, used by name


def upload(files: dict[str, str], metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "files": {"tar": ("code.tar", make_tar(files), "application/x-tar")},
        "data": {"metadata": json.dumps(metadata)},
    }


async def run(api: httpx.AsyncClient, code: str, **metadata: Any) -> dict[str, Any]:
    response = await api.post("/api/v1/exec/sync", **upload({"main.py": code}, metadata))
    record: dict[str, Any] = response.json()
    assert response.status_code == 200, record
    return record


async def test_a_png_and_a_csv_come_back_byte_exact(api: httpx.AsyncClient) -> None:
    """A PNG drawn with zlib + struct and a CSV come back listed, one by one and as a tar,
    byte for byte, with their sizes and SHA-256; a file no pattern names does not."""
    record = await run(api, PNG_PROGRAM, artifacts=["out/*.png", "results/**"])
    assert record["status"] == "completed", record
    assert record["stdout"] == "drew\n"
    expected = {"out/plot.png": png_bytes(), "results/2024/table.csv": CSV.encode()}
    listed = {a["path"]: a for a in record["artifacts"]}
    assert set(listed) == set(expected)
    assert record["artifacts_truncated"] is False
    execution_id = record["execution_id"]
    for path, data in expected.items():
        assert listed[path] == {
            "path": path,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
        one = await api.get(f"/api/v1/executions/{execution_id}/artifacts/{path}")
        assert one.status_code == 200
        assert one.content == data
    png = await api.get(f"/api/v1/executions/{execution_id}/artifacts/out/plot.png")
    assert png.headers["content-type"] == "image/png"
    everything = await api.get(f"/api/v1/executions/{execution_id}/artifacts")
    assert everything.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(everything.content)) as archive:
        got = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}  # type: ignore[union-attr]
    assert got == expected


async def test_an_unknown_artifact_is_a_404_with_a_stable_code(api: httpx.AsyncClient) -> None:
    """Asking for a path the record does not list answers 404 artifact_not_found."""
    record = await run(api, "open('a.txt', 'w').write('x')\n", artifacts=["*.txt"])
    execution_id = record["execution_id"]
    for path in ("b.txt", "main.py", "x/a.txt", "a.txt/"):
        response = await api.get(f"/api/v1/executions/{execution_id}/artifacts/{path}")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "artifact_not_found"


async def test_symlinks_and_paths_outside_return_nothing(api: httpx.AsyncClient) -> None:
    """Links to files outside (or inside) the working directory, a fifo and a link to a
    directory are never followed or returned; only the real file is."""
    code = (
        "import os\n"
        "os.makedirs('out', exist_ok=True)\n"
        "open('out/real.txt', 'w').write('real')\n"
        "os.symlink('/etc/passwd', 'out/passwd.txt')\n"
        "os.symlink('real.txt', 'out/alias.txt')\n"
        "os.symlink('/etc', 'out/etc')\n"
        "os.mkfifo('out/pipe.txt')\n"
    )
    record = await run(api, code, artifacts=["out/**", "/etc/passwd"[1:]])
    assert [a["path"] for a in record["artifacts"]] == ["out/real.txt"]
    assert record["artifacts_truncated"] is False


async def test_the_cap_is_exact(api: httpx.AsyncClient) -> None:
    """Files are taken in path order while they fit: the total never passes the cap,
    and the record says some were left out."""
    code = "for i in range(5):\n    open(f'f{i}.bin', 'wb').write(bytes(1000))\n"
    record = await run(api, code, artifacts=["*.bin"], config={"max_artifact_bytes": 3000})
    assert [a["path"] for a in record["artifacts"]] == ["f0.bin", "f1.bin", "f2.bin"]
    assert sum(a["size"] for a in record["artifacts"]) == 3000
    assert record["artifacts_truncated"] is True
    record = await run(api, code, artifacts=["*.bin"], config={"max_artifact_bytes": 5000})
    assert len(record["artifacts"]) == 5
    assert record["artifacts_truncated"] is False


async def test_a_timed_out_run_still_returns_its_artifacts(api: httpx.AsyncClient) -> None:
    """A run killed at its timeout keeps what it wrote before."""
    code = "open('partial.csv', 'w').write('a,b\\n1,2\\n')\nwhile True: pass\n"
    record = await run(api, code, artifacts=["*.csv"], config={"timeout_seconds": 2})
    assert record["reason"] == "timeout", record
    assert [a["path"] for a in record["artifacts"]] == ["partial.csv"]
    data = await api.get(f"/api/v1/executions/{record['execution_id']}/artifacts/partial.csv")
    assert data.content == b"a,b\n1,2\n"


async def test_output_that_looks_like_the_mark_stays_output(api: httpx.AsyncClient) -> None:
    """A program printing the bootstrap's mark (without the run's nonce) keeps its stdout,
    and its artifacts come back as well."""
    code = (
        "import sys\n"
        "sys.stdout.write('\\x00pyexec artifacts 0000\\nafter\\n')\n"
        "open('x.txt', 'w').write('x')\n"
    )
    record = await run(api, code, artifacts=["x.txt"])
    assert record["stdout"] == "\x00pyexec artifacts 0000\nafter\n"
    assert [a["path"] for a in record["artifacts"]] == ["x.txt"]


async def test_a_run_over_its_output_limit_still_returns_its_artifacts(
    api: httpx.AsyncClient,
) -> None:
    """Past the output cap the runner has the bootstrap stop the program and send the
    files it wrote; the verdict stays output_limit."""
    code = "open('before.txt', 'w').write('kept')\nwhile True:\n    print('x' * 1000)\n"
    record = await run(
        api, code, artifacts=["*.txt"], config={"max_output_bytes": 10_000, "timeout_seconds": 20}
    )
    assert record["reason"] == "output_limit", record
    assert len(record["stdout"]) <= 10_000
    assert [a["path"] for a in record["artifacts"]] == ["before.txt"]
    assert record["artifacts_truncated"] is False


async def test_a_pooled_sandbox_returns_artifacts_too(docker_client: docker.DockerClient) -> None:
    """A run on a warm-pool sandbox (its spec, with the nonce, sent when taken) brings its
    files back like a cold one."""
    settings = make_settings(pool_size=1)
    runner = DockerRunner(settings, docker_client)
    assert runner.pool is not None
    runner.pool.start()
    try:
        started = await start(runner, settings, {"main.py": PNG_PROGRAM}, artifacts=["out/*"])
        assert started.sandbox is not None
        outcome = await started.wait()
        assert [a.path for a in outcome.artifacts] == ["out/plot.png"]
        assert outcome.artifact_blob is not None
        blob = outcome.artifact_blob.read()
        outcome.artifact_blob.close()
        item = outcome.artifacts[0]
        assert blob[item.offset : item.offset + item.size] == png_bytes()
    finally:
        await runner.aclose()


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_collection_works_under_each_runtime(
    runtime: str, docker_client: docker.DockerClient
) -> None:
    """Under gVisor too, a run that leaves a background process and overruns its timeout
    gets its files back once every process is gone."""
    if runtime != "runc" and not runtime_registered(docker_client, runtime):
        pytest.skip(f"dockerd has no runtime {runtime!r} (scripts/bootstrap.sh registers runsc)")
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        "open('done.csv', 'w').write('1,2\\n')\n"
        "while True: pass\n"
    )
    settings = make_settings(docker_runtime=runtime)
    async with app_client(settings) as client:
        record = await run(client, code, artifacts=["*.csv"], config={"timeout_seconds": 2})
    assert record["reason"] == "timeout", record
    assert [a["path"] for a in record["artifacts"]] == ["done.csv"]


async def test_a_killed_run_still_returns_its_artifacts(api: httpx.AsyncClient) -> None:
    """Killing a run that asked for artifacts stops its sandbox so the bootstrap can send
    them: the record says killed and lists what it wrote."""
    code = (
        "import time\nopen('log.txt', 'w').write('so far')\n"
        "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    metadata = {"artifacts": ["*.txt"]}
    response = await api.post("/api/v1/exec/async", **upload({"main.py": code}, metadata))
    execution_id = response.json()["execution_id"]
    for _ in range(200):  # until the program has written its file (a bounded poll)
        logs = (await api.get(f"/api/v1/executions/{execution_id}/logs")).json()
        if "ready" in logs["stdout"]:
            break
        await asyncio.sleep(0.05)
    killed = await api.delete(f"/api/v1/executions/{execution_id}")
    assert killed.json()["status"] == "killed"
    for _ in range(200):  # the killed record gets what the run left once it is stored
        record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
        if record["artifacts"]:
            break
        await asyncio.sleep(0.05)
    assert record["status"] == "killed"
    assert [a["path"] for a in record["artifacts"]] == ["log.txt"]
    data = await api.get(f"/api/v1/executions/{execution_id}/artifacts/log.txt")
    assert data.content == b"so far"


#: Sleeps (so the test reads the run container's nonce label meanwhile), then writes to
#: ``seen.txt`` what it can read about itself, init and its parent (the bootstrap), and
#: prints whether the bootstrap's memory opens.
NONCE_HUNT = """
import os, time
time.sleep(1)
seen = [repr(dict(os.environ))]
names = ["/etc/hostname", "/etc/hosts", "/etc/resolv.conf"]
for pid in ("self", "1", str(os.getppid())):
    for part in ("environ", "cmdline", "mountinfo", "cgroup", "status"):
        names.append("/proc/" + pid + "/" + part)
for name in names:
    try:
        with open(name, "rb") as fh:
            seen.append(fh.read().decode("latin-1"))
    except OSError as exc:
        seen.append(name + ": " + str(exc))
open("seen.txt", "w").write("\\n".join(seen))
try:
    open("/proc/%d/mem" % os.getppid(), "rb").close()
    print("mem: readable")
except OSError:
    print("mem: denied")
"""


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_the_sandbox_cannot_learn_its_artifacts_nonce(
    runtime: str, docker_client: docker.DockerClient
) -> None:
    """The nonce of the artifacts mark is in the run container's label, but nothing the
    program can read holds it: not its environment or /proc, and not the bootstrap's
    memory (the bootstrap makes itself undumpable), so it cannot forge the mark."""
    if runtime != "runc" and not runtime_registered(docker_client, runtime):
        pytest.skip(f"dockerd has no runtime {runtime!r} (scripts/bootstrap.sh registers runsc)")
    settings = make_settings(docker_runtime=runtime)
    runner = DockerRunner(settings, docker_client)
    try:
        started = await start(runner, settings, {"main.py": NONCE_HUNT}, artifacts=["seen.txt"])
        (container,) = docker_client.containers.list(
            filters={"label": f"{LABEL_EXECUTION}={started.execution_id}"}
        )
        nonce = container.labels[LABEL_NONCE]
        outcome = await started.wait()
    finally:
        await runner.aclose()
    assert len(nonce) == 32
    assert outcome.stdout == "mem: denied\n", outcome
    assert outcome.artifact_blob is not None
    blob = outcome.artifact_blob.read()
    outcome.artifact_blob.close()
    (item,) = outcome.artifacts
    seen = blob[item.offset : item.offset + item.size]
    assert b"'HOME': '/work'" in seen  # (it did read its environment)
    assert nonce.encode() not in seen
