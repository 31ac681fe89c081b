"""The Nomad runner's warm pool: pre-dispatched slots waiting for their assignment in Consul.

Runs against nomadsim (which renders templates again when their keys change, as the
Nomad client does) and unchanged against a real agent with PYEXEC_TEST_NOMAD_ADDR. The
verdict tests of ``test_nomad_e2e`` run here again on pooled slots (imported, not
copied): this module's ``api`` fixture serves them from a warm pool and checks, after
each, that the pool served every run it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import httpx
import pytest

from pyexec.models import Execution, new_execution_id, parse_request
from pyexec.runner import nomad_job
from pyexec.runner.nomad_http import NomadAPI
from pyexec.runner.nomad_pool import NomadPool
from pyexec.settings import Settings
from pyexec.store import consul_keys
from pyexec.store.consul import ConsulStore

from .conftest import TEST_IMAGE, app_client, make_settings
from .fixtures_consul import CONSUL_ADDR, kv_delete_tree, kv_keys, kv_raw, new_prefix
from .nomadsim import NomadSim
from .tarfiles import make_tar
from .test_nomad_e2e import (
    REAL_NOMAD,
    SECCOMP_PROFILE,
    TASK_CONSUL,
    children_of,
    eventually,
    final,
    job_prefix,
    only_sim,
    run_sync,
    sim,
    submit,
    test_an_in_tree_symlink_behaves_as_on_docker,
    test_async_run_and_logs,
    test_eval_result_survives_the_nomad_path,
    test_large_output_is_kept_whole,
    test_out_of_memory,
    test_output_limit,
    test_pre_commands_prepare_the_files,
    test_sandbox_has_no_network_and_runs_as_uid_1000,
    test_setup_failure,
    test_sync_run_returns_output_exit_code_and_timings,
    test_the_run_task_has_the_sandboxs_seccomp_profile,
    test_timeout_inside_the_task,
)

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.nomad,
    pytest.mark.consul,
    pytest.mark.docker,
    pytest.mark.filterwarnings(
        r"ignore:Exception ignored in. <socket.socket \[closed\] fd=\d+, family=1"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
]

# The fixtures and verdict tests of the cold path, collected here again (pooled).
__all__ = [
    "job_prefix",
    "only_sim",
    "sim",
    "test_an_in_tree_symlink_behaves_as_on_docker",
    "test_async_run_and_logs",
    "test_eval_result_survives_the_nomad_path",
    "test_large_output_is_kept_whole",
    "test_out_of_memory",
    "test_output_limit",
    "test_pre_commands_prepare_the_files",
    "test_sandbox_has_no_network_and_runs_as_uid_1000",
    "test_setup_failure",
    "test_sync_run_returns_output_exit_code_and_timings",
    "test_the_run_task_has_the_sandboxs_seccomp_profile",
    "test_timeout_inside_the_task",
]

#: The resource class the host-level task tests build the pool job of.
CLASS = make_settings().nomad_resource_classes[0]
#: Seconds a slot may take to be ready (dispatch, placement, the task's start).
READY_TIMEOUT = 90.0


@pytest.fixture
def settings(sim: NomadSim | None, job_prefix: str) -> Iterator[Settings]:
    """A Nomad service with a warm pool of one slot for the test image; pre-commands run
    in the run task (no setup task), so they are pooled too."""
    prefix = new_prefix()
    yield make_settings(
        nomad_addr=REAL_NOMAD or (sim.address if sim else None),
        consul_addr=CONSUL_ADDR,
        consul_prefix=prefix,
        nomad_consul_addr=TASK_CONSUL,
        nomad_job_prefix=f"{job_prefix}-{secrets.token_hex(2)}",
        nomad_placement_timeout=60.0,
        nomad_seccomp_profile=str(SECCOMP_PROFILE),
        pool_size=1,
        pool_images=(TEST_IMAGE,),
    )
    with contextlib.suppress(httpx.HTTPError):
        kv_delete_tree(prefix)


def pool_of(api: httpx.AsyncClient) -> NomadPool:
    pool = api.app.state.pool  # type: ignore[attr-defined]
    assert isinstance(pool, NomadPool)
    return pool


async def pool_counts(api: httpx.AsyncClient) -> tuple[float, float]:
    """(hits, misses) of the test image, from /metrics."""
    text = (await api.get("/metrics")).text

    def total(name: str) -> float:
        pattern = rf'^{name}_total{{[^}}]*image="{re.escape(TEST_IMAGE)}"[^}}]*}} (\S+)$'
        return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.MULTILINE))

    return total("pyexec_pool_hits"), total("pyexec_pool_misses")


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The service with its slot ready; afterwards, every run of the test was pooled."""
    async with app_client(settings) as client:
        await pool_of(client).wait_ready(1, READY_TIMEOUT)
        yield client
        hits, misses = await pool_counts(client)
        lines = [x for x in (await client.get("/metrics")).text.splitlines() if "_pool_" in x]
        assert (hits >= 1, misses) == (True, 0), lines


def nomad_client(settings: Settings) -> httpx.Client:
    assert settings.nomad_addr
    return httpx.Client(base_url=settings.nomad_addr, timeout=30)


def live_pool_jobs(settings: Settings) -> list[str]:
    """Dispatched pool jobs Nomad still runs (not dead, not stopped)."""
    with nomad_client(settings) as client:
        stubs = client.get("/v1/jobs", params={"prefix": settings.nomad_job_prefix}).json()
    return [
        s["ID"]
        for s in stubs
        if nomad_job.POOL_SUFFIX + "/" in s["ID"] and s["Status"] != "dead" and not s.get("Stop")
    ]


# --- the pool through the API ------------------------------------------------------------


async def test_a_slot_serves_one_execution_only(api: httpx.AsyncClient) -> None:
    """Two executions each leave a marker in /work and list it: each sees only its own, in
    a container of its own; the slot that served the first is gone afterwards."""
    code = (
        "import os, socket, sys\n"
        "open(sys.argv[1], 'w').write('x')\n"
        "print(sorted(os.listdir('/work')), socket.gethostname())\n"
    )
    pool = pool_of(api)
    first = await run_sync(api, code, script_args=["first.txt"])
    await pool.wait_ready(1, READY_TIMEOUT)
    second = await run_sync(api, code, script_args=["second.txt"])
    seen = [b["stdout"].split() for b in (first, second)]
    assert [s[:2] for s in seen] == [
        ["['first.txt',", "'main.py']"],
        ["['main.py',", "'second.txt']"],
    ], (first, second)
    assert seen[0][2] != seen[1][2]


async def test_a_finished_runs_slot_keys_are_dropped(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    """Once a pooled run's outcome is handed over, its claim and its copy of the inputs
    (the tar) leave Consul; only the refill's ready slot is left."""
    await run_sync(api, "print('done')")
    pool_root = f"{settings.consul_prefix}/pool"

    async def dropped() -> bool:
        keys = kv_keys(pool_root)
        return not any("/inputs/" in k for k in keys) and all(
            b'"ready"' in (kv_raw(k) or b"") for k in keys
        )

    await eventually(dropped, timeout=30)


async def test_started_at_is_when_the_code_starts(api: httpx.AsyncClient) -> None:
    """A pooled run's times are its own: started_at after the submit, not when the slot
    was made."""
    await asyncio.sleep(1.5)  # the slot is older than this
    before = time.time()
    body = await run_sync(api, "print('t')")
    from datetime import datetime

    started = datetime.fromisoformat(body["started_at"].replace("Z", "+00:00")).timestamp()
    assert started >= before - 0.5, (before, body["started_at"])
    assert body["duration_ms"] < 10_000


async def test_kill_stops_the_slot(api: httpx.AsyncClient, settings: Settings) -> None:
    """DELETE of a pooled run stops its slot's job; the record says killed."""
    execution_id = await submit(api, "import time\nprint('started', flush=True)\ntime.sleep(120)\n")

    async def running() -> bool:
        record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
        return bool(record["status"] == "running")

    await eventually(running)
    killed = (await api.delete(f"/api/v1/executions/{execution_id}")).json()
    assert killed["status"] == "killed"
    body = await final(api, execution_id)
    assert body["status"] == "killed"


async def test_unpooled_requests_take_the_cold_path(settings: Settings) -> None:
    """Another image's class (a bigger memory) is dispatched cold with the same result,
    counted as a miss."""
    async with app_client(settings) as api:
        await pool_of(api).wait_ready(1, READY_TIMEOUT)
        big = max(settings.nomad_resource_classes, key=lambda c: c.memory_mb)
        body = await run_sync(api, "print('cold')", config={"memory_mb": big.memory_mb})
        assert (body["status"], body["stdout"]) == ("completed", "cold\n"), body
        assert await pool_counts(api) == (0.0, 1.0)


async def test_expired_slot_is_replaced(settings: Settings) -> None:
    """A slot older than PYEXEC_POOL_MAX_IDLE_SECONDS is withdrawn, its job stopped, and a
    fresh one takes its place; runs are still served."""
    short = attrs.evolve(settings, pool_max_idle_seconds=4.0)
    async with app_client(short) as api:
        pool = pool_of(api)
        await pool.wait_ready(1, READY_TIMEOUT)
        (first,) = pool.owned_jobs()

        async def replaced() -> bool:
            jobs = pool.owned_jobs()
            return bool(jobs) and first not in jobs and pool.ready()[TEST_IMAGE] == 1

        await eventually(replaced, timeout=READY_TIMEOUT)
        assert first not in live_pool_jobs(short)
        body = await run_sync(api, "print('fresh')")
        assert body["stdout"] == "fresh\n"
        assert (await pool_counts(api))[0] == 1.0


async def test_shutdown_leaves_no_pool_job(settings: Settings) -> None:
    """Closing the service stops and purges every slot it held: 0 pool jobs left."""
    async with app_client(settings) as api:
        await pool_of(api).wait_ready(1, READY_TIMEOUT)
        assert len(live_pool_jobs(settings)) == 1
    assert live_pool_jobs(settings) == []
    assert kv_raw(consul_keys.pool_slots_root(settings.consul_prefix).rstrip("/")) is None


async def test_health_says_when_the_pool_is_empty(settings: Settings) -> None:
    """/health is degraded while the pool fills, ok once a slot is ready, and lists it."""
    async with app_client(settings) as api:
        pool = pool_of(api)
        await pool.wait_ready(1, READY_TIMEOUT)
        body = (await api.get("/health")).json()
        assert (body["status"], body["pool"]["ready"]) == ("ok", {TEST_IMAGE: 1})


async def test_nomad_outage_empties_then_refills(settings: Settings, only_sim: NomadSim) -> None:
    """While Nomad is unreachable the pool is empty (/health says so); afterwards it
    refills by itself and serves runs; the slot made before the outage is stopped."""
    async with app_client(settings) as api:
        pool = pool_of(api)
        await pool.wait_ready(1, READY_TIMEOUT)
        (before,) = pool.owned_jobs()
        only_sim.set_reachable(False)
        try:

            async def emptied() -> bool:
                return pool.ready() == {TEST_IMAGE: 0}

            await eventually(emptied, timeout=30)
            body = (await api.get("/health")).json()
            assert body["pool"]["empty"] == [TEST_IMAGE]
        finally:
            only_sim.set_reachable(True)
        await pool.wait_ready(1, READY_TIMEOUT)
        assert before not in pool.owned_jobs()

        async def stopped() -> bool:
            return before not in live_pool_jobs(settings)

        await eventually(stopped, timeout=30)
        body = await run_sync(api, "print('back')")
        assert body["stdout"] == "back\n"


@pytest.mark.parametrize("next_pool_size", [2, 0], ids=["pool-on", "pool-off"])
async def test_restart_mid_flight_adopts_the_pooled_run(
    settings: Settings, next_pool_size: int
) -> None:
    """A pooled run in flight when the service stops is finished by the next service
    (found by its claim in Consul), once: nothing is dispatched for it. Also when the
    next service has the pool turned off."""
    async with app_client(settings) as api:
        await pool_of(api).wait_ready(1, READY_TIMEOUT)
        code = "import time\nprint('begin', flush=True)\ntime.sleep(4)\nprint('end')\n"
        execution_id = await submit(api, code)

        async def running() -> bool:
            record = (await api.get(f"/api/v1/executions/{execution_id}")).json()
            return bool(record["status"] == "running")

        await eventually(running)
        assert (await pool_counts(api))[0] == 1.0
    async with app_client(attrs.evolve(settings, pool_size=next_pool_size)) as api:
        body = await final(api, execution_id)
    assert (body["status"], body["stdout"]) == ("completed", "begin\nend\n"), body
    assert children_of(settings, execution_id) == []


# --- replicas and restarts ----------------------------------------------------------------


async def new_execution(store: ConsulStore, settings: Settings) -> Execution:
    request = parse_request({"docker_image": TEST_IMAGE}, settings)
    record = Execution(execution_id=new_execution_id(), request=request)
    await store.create(record, io.BytesIO(make_tar({"main.py": "print('hi')"})))
    return record


def pool_for(settings: Settings, owner: str, size: int) -> NomadPool:
    pool = NomadPool.from_settings(attrs.evolve(settings, pool_size=0), NomadAPI(settings))
    pool.owner = owner
    pool.keep(parse_request({"docker_image": TEST_IMAGE}, settings), size)
    return pool


async def purge(settings: Settings, job_ids: list[str]) -> None:
    with nomad_client(settings) as client:
        for job_id in job_ids:
            client.delete(f"/v1/job/{job_id}", params={"purge": "true"})


async def test_two_replicas_never_take_the_same_slot(settings: Settings) -> None:
    """Two service processes sharing one Consul claim slots concurrently: every claim is
    a different slot, and each slot's inputs are its claimant's execution."""
    owner = f"{socket.gethostname()}:{os.getpid()}:"
    a = pool_for(settings, owner + "a", 2)
    b = pool_for(settings, owner + "b", 0)  # keeps none: it takes the other's
    store = ConsulStore.from_settings(settings)
    claimed: list[str] = []
    try:
        await a.startup()
        await a.wait_ready(2, READY_TIMEOUT)
        records = [await new_execution(store, settings) for _ in range(4)]
        takes = [
            (pool.take(r.execution_id, r.request), r.execution_id)
            for pool, r in zip((a, b, b, a), records, strict=True)
            if r.request is not None
        ]
        claims = await asyncio.gather(*(t for t, _ in takes))
        got = [(c, eid) for c, (_, eid) in zip(claims, takes, strict=True) if c is not None]
        claimed = [c.slot.job_id for c, _ in got]
        assert len(got) >= 2
        assert len({c.slot.slot_id for c, _ in got}) == len(got)
        for claim, execution_id in got:
            folder = consul_keys.pool_inputs_folder(settings.consul_prefix, claim.slot.slot_id)
            record = kv_raw(folder + "record")
            assert record is not None
            assert execution_id.encode() in record
    finally:
        for pool in (a, b):
            await pool.aclose()
            await pool._api.aclose()
        await store.aclose()
        await purge(settings, claimed)
    assert live_pool_jobs(settings) == []


async def test_restart_sweeps_a_crashed_process_slots(settings: Settings) -> None:
    """Slots a process on this host left when it died (its pid gone) are withdrawn and
    their jobs stopped by the next process's start-up."""
    crashed = pool_for(settings, f"{socket.gethostname()}:999999999:1", 1)
    await crashed.startup()
    await crashed.wait_ready(1, READY_TIMEOUT)
    (left,) = crashed.owned_jobs()
    # A crash: nothing of it runs any more, nothing was withdrawn.
    tasks = [t for t in [*crashed._tasks, crashed._maintainer] if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert left in live_pool_jobs(settings)
    successor = pool_for(settings, f"{socket.gethostname()}:{os.getpid()}:x", 0)
    try:
        await successor.startup()
        assert left not in live_pool_jobs(settings)
        slots = kv_raw(consul_keys.pool_slots_root(settings.consul_prefix).rstrip("/"))
        assert slots is None
    finally:
        await successor.aclose()
        await successor._api.aclose()
        await crashed._kv.aclose()
        await crashed._api.aclose()


def test_pool_job_is_the_runner_jobs_run_task(settings: Settings) -> None:
    """The pool job's run task is the runner job's, but for its inputs (the slot's folder)
    and the wait; no finish task; a plain dispatch's job is unchanged."""
    resource_class = settings.nomad_resource_classes[0]
    cold = nomad_job.runner_job(settings, resource_class)
    pooled = nomad_job.pool_job(settings, resource_class)
    (run,) = pooled["TaskGroups"][0]["Tasks"]
    cold_run = next(t for t in cold["TaskGroups"][0]["Tasks"] if t["Name"] == "run")
    assert run["Config"] == cold_run["Config"]
    assert run["Resources"] == cold_run["Resources"]
    assert {k: v for k, v in run["Env"].items() if k != "PYEXEC_POOL_WAIT_SECONDS"} == (
        cold_run["Env"]
    )
    inputs = [t for t in run["Templates"] if "LeftDelim" not in t]
    assert all("pool/inputs/%s/" in t["EmbeddedTmpl"] for t in inputs)
    assert all('(env "NOMAD_META_slot")' in t["EmbeddedTmpl"] for t in inputs)
    assert all(t["ChangeMode"] == "noop" for t in run["Templates"])
    assert pooled["ID"] == nomad_job.pool_job_id(settings, resource_class) != cold["ID"]
    assert pooled["ParameterizedJob"]["MetaRequired"] == ["slot"]
    assert "NOMAD_META_execution_id" not in json.dumps(pooled)  # a slot has no execution yet


# --- the slot's run task, on the host ------------------------------------------------------


def start_slot_task(tmp_path: Path, wait_seconds: float) -> subprocess.Popen[bytes]:
    """The pool job's run task as Nomad starts it, its inputs rendered empty."""
    local, alloc, work = tmp_path / "local", tmp_path / "alloc", tmp_path / "work"
    for path in (local / "pyexec", alloc / "data", work):
        path.mkdir(parents=True, exist_ok=True)
    run = next(t for t in nomad_job.pool_job(make_settings(), CLASS)["TaskGroups"][0]["Tasks"])
    for template in run["Templates"]:
        if "LeftDelim" in template:  # the service's modules the run task gets
            (tmp_path / template["DestPath"]).write_text(template["EmbeddedTmpl"])
    for name in ("bundle.tar", "manifest.json", "record.json"):
        (local / name).write_bytes(b"")
    env = {
        "PATH": os.environ["PATH"],
        "NOMAD_TASK_DIR": str(local),
        "NOMAD_ALLOC_DIR": str(alloc),
        "PYEXEC_WORK_DIR": str(work),
        "PYEXEC_POOL_WAIT_SECONDS": str(wait_seconds),
    }
    argv = [sys.executable, "-I", "-S", str(local / "pyexec" / "nomad_run.py")]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def render(path: Path, data: bytes) -> None:
    """Write a file the way the Nomad client's template runner does (a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def test_an_unclaimed_slot_task_exits_after_its_wait(tmp_path: Path) -> None:
    """A slot nobody claims ends by itself after PYEXEC_POOL_WAIT_SECONDS, exit 0 and no
    verdict (nothing ran)."""
    task = start_slot_task(tmp_path, 1.0)
    _, stderr = task.communicate(timeout=30)
    assert task.returncode == 0
    assert b"no execution was assigned" in stderr
    assert not (tmp_path / "alloc" / "data" / "pyexec" / "verdict.json").exists()


def test_a_slot_task_runs_its_assignment_once_the_tar_is_whole(tmp_path: Path) -> None:
    """The record may be rendered before the tar (each template renders on its own): the
    task waits for the tar to reach the manifest's size, then runs it as a cold task."""
    task = start_slot_task(tmp_path, 60.0)
    tar = make_tar({"main.py": "import sys\nprint('ran', sys.stdin.read())\n"})
    local = tmp_path / "local"
    time.sleep(0.5)
    request = {"entrypoint": "main.py", "stdin": "fed", "config": {"timeout_seconds": 20}}
    render(local / "record.json", json.dumps({"status": "pending", "request": request}).encode())
    manifest = {"size": len(tar), "sha256": hashlib.sha256(tar).hexdigest()}
    render(local / "manifest.json", json.dumps(manifest).encode())
    time.sleep(0.3)
    render(local / "bundle.tar", tar)
    task.communicate(timeout=30)
    assert task.returncode == 0
    out = tmp_path / "alloc" / "data" / "pyexec"
    verdict = json.loads((out / "verdict.json").read_text())
    assert (verdict["reason"], verdict["exit_code"]) == ("exited", 0), verdict
    assert (out / "stdout").read_bytes() == b"ran fed\n"
