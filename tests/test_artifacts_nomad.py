"""Artifacts on the Nomad backend: the run task leaves them in the allocation directory and
the service reads them with the client filesystem API (fs/ls + fs/readat).

Runs against nomadsim by default and unchanged against a real agent when
PYEXEC_TEST_NOMAD_ADDR is set (as ``test_nomad_e2e``, whose fixtures it shares). Checked
on Nomad v1.6.5 (dev agent, docker driver): ``fs/ls`` lists ``artifacts.tar`` with its
size beside ``verdict.json`` and ``fs/readat`` with an ``offset`` returns that slice.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import secrets
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pyexec.models import Execution, Status, new_execution_id, parse_request
from pyexec.settings import Settings
from pyexec.store.consul import ConsulStore

from . import test_nomad_e2e as e2e
from .artifact_files import CSV, PNG_PROGRAM, png_bytes
from .nomadsim import NomadSim
from .tarfiles import make_tar

pytestmark = e2e.pytestmark

# The e2e module's fixtures, by name (the job prefix is this helper's own).
sim = e2e.sim
settings = e2e.settings
api = e2e.api


@pytest.fixture(scope="module")
def job_prefix(sim: NomadSim | None) -> Iterator[str]:
    """Runner jobs of this module get their own names; purged afterwards on a real agent."""
    prefix = f"artifacts-test-{secrets.token_hex(3)}"
    yield prefix
    if e2e.REAL_NOMAD:
        with httpx.Client(base_url=e2e.REAL_NOMAD, timeout=30) as nomad:
            for stub in nomad.get("/v1/jobs", params={"prefix": prefix}).json():
                nomad.delete(f"/v1/job/{stub['ID']}", params={"purge": "true"})


async def run(api: httpx.AsyncClient, code: str, **metadata: Any) -> dict[str, Any]:
    return await e2e.run_sync(api, code, **metadata)


async def test_a_png_and_a_csv_come_back_through_the_allocation_directory(
    api: httpx.AsyncClient,
) -> None:
    """The run task's artifacts reach the record and the API byte for byte."""
    record = await run(api, PNG_PROGRAM, artifacts=["out/*.png", "results/**"])
    assert record["status"] == "completed", record
    expected = {"out/plot.png": png_bytes(), "results/2024/table.csv": CSV.encode()}
    assert {a["path"]: (a["size"], a["sha256"]) for a in record["artifacts"]} == {
        path: (len(data), hashlib.sha256(data).hexdigest()) for path, data in expected.items()
    }
    assert record["artifacts_truncated"] is False
    execution_id = record["execution_id"]
    for path, data in expected.items():
        one = await api.get(f"/api/v1/executions/{execution_id}/artifacts/{path}")
        assert one.content == data
    everything = await api.get(f"/api/v1/executions/{execution_id}/artifacts")
    with tarfile.open(fileobj=io.BytesIO(everything.content)) as archive:
        got = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}  # type: ignore[union-attr]
    assert got == expected


async def test_links_are_never_followed_and_the_cap_holds(api: httpx.AsyncClient) -> None:
    """A symlink out of /work is not returned; the total stops at the cap, flagged."""
    code = (
        "import os\n"
        "os.symlink('/etc/passwd', 'passwd.txt')\n"
        "for i in range(3):\n"
        "    open(f'f{i}.txt', 'w').write('x' * 100)\n"
    )
    record = await run(api, code, artifacts=["*.txt"], config={"max_artifact_bytes": 250})
    assert [a["path"] for a in record["artifacts"]] == ["f0.txt", "f1.txt"]
    assert record["artifacts_truncated"] is True


async def test_a_timed_out_run_keeps_its_artifacts(api: httpx.AsyncClient) -> None:
    """The run task collects after killing a program that overran its timeout."""
    code = "open('partial.csv', 'w').write('a,b\\n')\nwhile True: pass\n"
    record = await run(api, code, artifacts=["*.csv"], config={"timeout_seconds": 2})
    assert record["reason"] == "timeout", record
    assert [a["path"] for a in record["artifacts"]] == ["partial.csv"]
    data = await api.get(f"/api/v1/executions/{record['execution_id']}/artifacts/partial.csv")
    assert data.content == b"a,b\n"


async def test_a_large_artifact_is_read_in_slices(api: httpx.AsyncClient) -> None:
    """A file larger than one fs/readat (4 MiB) comes back whole: the reads at an offset
    join up exactly (Nomad 1.6.5 answers offset+limit with that slice)."""
    code = (
        "import random\n"
        "open('big.bin', 'wb').write(random.Random(7).randbytes(5 * 1024 * 1024 + 123))\n"
    )
    record = await run(api, code, artifacts=["big.bin"])
    expected = random.Random(7).randbytes(5 * 1024 * 1024 + 123)
    assert record["artifacts"] == [
        {"path": "big.bin", "size": len(expected), "sha256": hashlib.sha256(expected).hexdigest()}
    ]
    got = await api.get(f"/api/v1/executions/{record['execution_id']}/artifacts/big.bin")
    assert got.content == expected


async def test_a_process_left_in_its_own_session_does_not_stop_collection(
    api: httpx.AsyncClient,
) -> None:
    """A process the program left in a session of its own (which the run task, the
    container's first process, ends before it collects) neither holds the run up nor
    keeps its files from coming back."""
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " start_new_session=True)\n"
        "open('done.csv', 'w').write('1,2\\n')\n"
    )
    record = await run(api, code, artifacts=["*.csv"])
    assert record["status"] == "completed", record
    assert [a["path"] for a in record["artifacts"]] == ["done.csv"]


async def test_a_killed_run_lists_what_it_wrote(api: httpx.AsyncClient) -> None:
    """A kill stops the job; the run task, stopped, still collects before it exits, and the
    killed record lists the file."""
    code = (
        "import time\nopen('log.txt', 'w').write('so far')\n"
        "print('ready', flush=True)\ntime.sleep(120)\n"
    )
    execution_id = await e2e.submit(api, code, artifacts=["*.txt"])

    async def ready() -> bool:
        logs = (await api.get(f"/api/v1/executions/{execution_id}/logs")).json()
        return "ready" in logs["stdout"]

    await e2e.eventually(ready)
    await api.delete(f"/api/v1/executions/{execution_id}")

    async def listed() -> bool:
        record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
        return bool(record["artifacts"])

    await e2e.eventually(listed)
    record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
    assert record["status"] == "killed"
    assert [a["path"] for a in record["artifacts"]] == ["log.txt"]


async def test_a_plain_dispatch_stores_its_artifacts_through_the_finish_task(
    settings: Settings,
) -> None:
    """`nomad job dispatch` without the service: the finish task checks the run task's
    artifacts as the service does and stores them beside the record; the API serves them."""
    async with e2e.pyexec_api(settings):
        pass  # registers the runner jobs, as the service does at start-up
    request = parse_request({"artifacts": ["out/*.png", "results/**"]}, settings)
    record = Execution(execution_id=new_execution_id(), request=request)
    store = ConsulStore.from_settings(settings)
    try:
        await store.create(record, io.BytesIO(make_tar({"main.py": PNG_PROGRAM})))
        await asyncio.to_thread(e2e.dispatch_directly, settings, record.execution_id)
        done = await store.wait_terminal(record.execution_id, 90)
        deadline = time.monotonic() + 90
        while not done.terminal and time.monotonic() < deadline:
            done = await store.wait_terminal(record.execution_id, 30)
    finally:
        await store.aclose()
    assert done.status is Status.COMPLETED, done
    expected = {"out/plot.png": png_bytes(), "results/2024/table.csv": CSV.encode()}
    assert {a.path: a.sha256 for a in done.artifacts} == {
        path: hashlib.sha256(data).hexdigest() for path, data in expected.items()
    }
    assert done.artifacts_truncated is False
    async with e2e.pyexec_api(settings) as api:
        for path, data in expected.items():
            got = await api.get(f"/api/v1/executions/{record.execution_id}/artifacts/{path}")
            assert got.content == data
