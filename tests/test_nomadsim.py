"""Pins nomadsim (tests/nomadsim) to Nomad's documented HTTP behaviour.

The wire-level tests also run against a real agent when PYEXEC_TEST_NOMAD_ADDR
is set (with the runner image present on its docker client); tests of the
double's own switches (hold/release, faults, ACL token) then skip.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from .conftest import TEST_IMAGE
from .nomadsim import NomadSim

IMAGE = TEST_IMAGE
REAL_NOMAD = os.environ.get("PYEXEC_TEST_NOMAD_ADDR")
NODE_MEMORY_MB = 4096

pytestmark = pytest.mark.nomad


@pytest.fixture(scope="module")
def sim() -> Iterator[NomadSim | None]:
    if REAL_NOMAD:
        yield None
        return
    double = NomadSim(heartbeat_s=1.0, node_memory_mb=NODE_MEMORY_MB)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def only_sim(sim: NomadSim | None) -> NomadSim:
    if sim is None:
        pytest.skip("exercises a switch of the double; a real agent has none")
    return sim


@pytest.fixture(scope="module")
def client(sim: NomadSim | None) -> Iterator[httpx.Client]:
    addr = REAL_NOMAD or (sim.address if sim else "")
    with httpx.Client(base_url=addr, timeout=60) as c:
        before = _test_jobs(c)
        yield c
        if REAL_NOMAD:
            # A real agent outlives the module: purge the jobs these tests registered
            # (their dispatched children are garbage-collected with them).
            for job_id in _test_jobs(c) - before:
                c.delete(f"/v1/job/{jid(job_id)}", params={"purge": "true"})


def _test_jobs(client: httpx.Client) -> set[str]:
    r = client.get("/v1/jobs", params={"prefix": "nomadsim-"})
    r.raise_for_status()
    return {job["ID"] for job in r.json() if not job.get("ParentID")}


def jid(job_id: str) -> str:
    return quote(job_id, safe="")


def task(name: str, code: str, hook: str | None = None, **extra: Any) -> dict[str, Any]:
    config = {"image": IMAGE, "command": "python3", "args": ["-c", code]}
    config.update(extra.pop("config", {}))
    spec: dict[str, Any] = {
        "Name": name,
        "Driver": "docker",
        "Config": config,
        "Resources": {"CPU": 100, "MemoryMB": extra.pop("memory", 64)},
        "KillTimeout": 1_000_000_000,
        **extra,
    }
    if hook:
        spec["Lifecycle"] = {"Hook": hook, "Sidecar": False}
    return spec


def register(client: httpx.Client, tasks: list[dict[str, Any]], **job: Any) -> str:
    """Register a parameterized batch job with no restarts; returns its ID."""
    job_id = f"nomadsim-test-{uuid.uuid4().hex[:8]}"
    body = {
        "ID": job_id,
        "Type": "batch",
        "Datacenters": ["*"],
        "ParameterizedJob": {"Payload": "optional", "MetaRequired": [], "MetaOptional": []},
        "TaskGroups": [
            {
                "Name": "run",
                "Count": 1,
                "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                "Tasks": tasks,
            }
        ],
    }
    body.update(job)
    r = client.put("/v1/jobs", json={"Job": body})
    assert r.status_code == 200, r.text
    assert set(r.json()) >= {"EvalID", "EvalCreateIndex", "JobModifyIndex", "Warnings"}
    return job_id


def dispatch(client: httpx.Client, job_id: str, payload: bytes = b"", **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"Meta": kw.pop("meta", {})}
    if payload:
        body["Payload"] = base64.b64encode(payload).decode()
    return client.post(f"/v1/job/{jid(job_id)}/dispatch", json=body, params=kw)


def wait_done(client: httpx.Client, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """Follow the job's allocations with blocking queries until every task is dead."""
    deadline = time.monotonic() + timeout
    index = 0
    while time.monotonic() < deadline:
        r = client.get(f"/v1/job/{jid(job_id)}/allocations", params={"index": index, "wait": "5s"})
        assert r.status_code == 200, r.text
        index = int(r.headers["X-Nomad-Index"])
        for stub in r.json():
            states = stub["TaskStates"] or {}
            if stub["ClientStatus"] in ("complete", "failed") and all(
                s["State"] == "dead" for s in states.values()
            ):
                alloc: dict[str, Any] = client.get(f"/v1/allocation/{stub['ID']}").json()
                return alloc
    raise AssertionError(f"{job_id} did not finish in {timeout}s")


def wait_running(client: httpx.Client, job_id: str, task_name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    index = 0
    while time.monotonic() < deadline:
        r = client.get(f"/v1/job/{jid(job_id)}/allocations", params={"index": index, "wait": "5s"})
        index = int(r.headers["X-Nomad-Index"])
        for stub in r.json():
            state = (stub["TaskStates"] or {}).get(task_name)
            if state and state["State"] == "running":
                return dict(stub)
    raise AssertionError(f"{task_name} of {job_id} never ran")


def logs(client: httpx.Client, alloc_id: str, task_name: str, **params: str) -> httpx.Response:
    return client.get(
        f"/v1/client/fs/logs/{alloc_id}", params={"task": task_name, "origin": "start", **params}
    )


def shipped_logs(
    client: httpx.Client, alloc_id: str, task_name: str, **params: str
) -> httpx.Response:
    """The logs of a finished task once its log shipper has written them.

    Seen on Nomad 1.6.5 under load: an allocation is reported complete while the logmon
    of one of its tasks has not flushed yet, so fs/logs answers 200 with an empty body for
    a moment (why the runner reads the alloc dir, not the logs). Bounded: 10 s.
    """
    deadline = time.monotonic() + 10
    while True:
        r = logs(client, alloc_id, task_name, **params)
        if r.status_code != 200 or r.content or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def events(alloc: dict[str, Any], task_name: str) -> list[str]:
    return [e["Type"] for e in alloc["TaskStates"][task_name]["Events"]]


def terminated(alloc: dict[str, Any], task_name: str) -> dict[str, Any]:
    return next(e for e in alloc["TaskStates"][task_name]["Events"] if e["Type"] == "Terminated")


MAIN_CODE = r"""
import errno, json, os, sys
facts = {
    "meta": os.environ["NOMAD_META_who"],
    "meta_upper": os.environ["NOMAD_META_WHO"],
    "optional": os.environ.get("NOMAD_META_extra"),
    "payload": open("/local/payload.bin", "rb").read().hex(),
    "template": open("/local/conf.txt").read(),
    "dirs": [os.environ[k] for k in ("NOMAD_ALLOC_DIR", "NOMAD_TASK_DIR", "NOMAD_SECRETS_DIR")],
    "job": os.environ["NOMAD_JOB_ID"], "parent": os.environ["NOMAD_JOB_PARENT_ID"],
    "alloc": os.environ["NOMAD_ALLOC_ID"], "arg": sys.argv[1],
    "uid": os.getuid(), "nets": sorted(os.listdir("/sys/class/net")),
}
try:
    open("/tmp/rootfs-probe", "w")
    facts["rootfs"] = "writable"
except OSError as exc:
    facts["rootfs"] = errno.errorcode[exc.errno]
open("/scratch/x", "w").write("tmpfs ok")
open("/alloc/data/exit", "w").write("3")
print(json.dumps(facts))
print("to stderr", file=sys.stderr)
sys.exit(3)
"""


@pytest.mark.docker
def test_dispatch_runs_the_group_and_reports_exit_code_logs_and_poststop(
    client: httpx.Client,
) -> None:
    """A dispatch runs main with meta, payload and template, then poststop; the exit code
    is in the Terminated event and both logs are served plain and framed."""
    main = task(
        "main",
        MAIN_CODE,
        config={
            "args": ["-c", MAIN_CODE, "${NOMAD_META_who}"],
            "network_mode": "none",
            "readonly_rootfs": True,
            "cap_drop": ["all"],
            "pids_limit": 64,
            "mount": [{"type": "tmpfs", "target": "/scratch", "tmpfs_options": {"size": 1 << 20}}],
        },
        User="65534",
        DispatchPayload={"File": "payload.bin"},
        Templates=[
            {"EmbeddedTmpl": "literal text\n", "DestPath": "local/conf.txt", "Perms": "0644"}
        ],
    )
    post = task("post", "print('poststop saw exit', open('/alloc/data/exit').read())", "poststop")
    job_id = register(
        client,
        [main, post],
        ParameterizedJob={
            "Payload": "optional",
            "MetaRequired": ["who"],
            "MetaOptional": ["extra"],
        },
    )
    r = dispatch(client, job_id, b"\x00\xffbin", meta={"who": "ada"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"DispatchedJobID", "EvalID", "EvalCreateIndex", "JobCreateIndex", "Index"}
    child = out["DispatchedJobID"]
    assert re.fullmatch(rf"{job_id}/dispatch-\d{{10}}-[0-9a-f]{{8}}", child)

    alloc = wait_done(client, child)
    assert alloc["ClientStatus"] == "failed"
    assert alloc["DesiredStatus"] == "run"
    main_state = alloc["TaskStates"]["main"]
    assert main_state["Failed"] is True
    assert events(alloc, "main")[-2:] == ["Terminated", "Not Restarting"]
    term = terminated(alloc, "main")
    assert term["Details"]["exit_code"] == "3"
    assert term["Details"]["oom_killed"] == "false"
    assert term["ExitCode"] == 3
    assert isinstance(term["Time"], int)
    assert term["Time"] > 10**18
    assert alloc["TaskStates"]["post"]["State"] == "dead"
    assert alloc["TaskStates"]["post"]["Failed"] is False

    stdout = shipped_logs(client, alloc["ID"], "main", type="stdout", plain="true")
    assert stdout.status_code == 200
    facts = json.loads(stdout.text)
    assert facts == {
        "meta": "ada",
        "meta_upper": "ada",
        "optional": "",
        "payload": b"\x00\xffbin".hex(),
        "template": "literal text\n",
        "dirs": ["/alloc", "/local", "/secrets"],
        "job": child,
        "parent": job_id,
        "alloc": alloc["ID"],
        "arg": "ada",
        "uid": 65534,
        "nets": ["lo"],
        "rootfs": "EROFS",
    }
    assert shipped_logs(client, alloc["ID"], "main", type="stderr", plain="true").text == (
        "to stderr\n"
    )
    framed = logs(client, alloc["ID"], "main", type="stdout").text
    decoder, pos, data = json.JSONDecoder(), 0, b""
    while pos < len(framed):
        frame, pos = decoder.raw_decode(framed, pos)
        if frame:
            assert frame["File"] == "alloc/logs/main.stdout.0"
            data += base64.b64decode(frame["Data"])
            assert frame["Offset"] == len(data)
    assert data.decode() == stdout.text
    post_out = shipped_logs(client, alloc["ID"], "post", type="stdout", plain="true").text
    assert post_out == "poststop saw exit 3\n"
    assert client.get(f"/v1/job/{jid(child)}").json()["Status"] == "dead"


@pytest.mark.docker
def test_prestart_failure_keeps_main_from_running(client: httpx.Client) -> None:
    """A failing prestart task fails the alloc; main never starts and has no logs (404)."""
    pre = task("pre", "import sys; sys.exit(1)", "prestart")
    main = task("main", "print('must not run')")
    job_id = register(client, [pre, main])
    child = dispatch(client, job_id).json()["DispatchedJobID"]
    alloc = wait_done(client, child)
    assert alloc["ClientStatus"] == "failed"
    assert alloc["TaskStates"]["pre"]["Failed"] is True
    main_state = alloc["TaskStates"]["main"]
    assert main_state["State"] == "dead"
    assert main_state["StartedAt"] is None  # null on Nomad 1.6.5, not Go's zero time
    assert "Started" not in events(alloc, "main")
    assert "Sibling Task Failed" in events(alloc, "main")
    r = logs(client, alloc["ID"], "main", type="stdout", plain="true")
    assert r.status_code == 404
    assert r.text == 'task "main" not started yet. No logs available'


@pytest.mark.docker
def test_stop_kills_main_then_runs_poststop(client: httpx.Client) -> None:
    """DELETE /v1/job kills main (SIGTERM, then SIGKILL after kill_timeout) and poststop runs."""
    main = task("main", "import time; print('up', flush=True); time.sleep(120)")
    post = task("post", "print('cleanup')", "poststop")
    job_id = register(client, [main, post])
    child = dispatch(client, job_id).json()["DispatchedJobID"]
    wait_running(client, child, "main")
    r = client.delete(f"/v1/job/{jid(child)}")
    assert r.status_code == 200
    assert r.json()["EvalID"]
    alloc = wait_done(client, child)
    assert alloc["DesiredStatus"] == "stop"
    assert alloc["ClientStatus"] == "complete"
    assert events(alloc, "main")[-3:] == ["Killing", "Terminated", "Killed"]
    assert alloc["TaskStates"]["main"]["Failed"] is False
    assert shipped_logs(client, alloc["ID"], "post", type="stdout", plain="true").text == (
        "cleanup\n"
    )
    job = client.get(f"/v1/job/{jid(child)}").json()
    assert job["Stop"] is True
    assert job["Status"] == "dead"
    again = client.delete(f"/v1/job/{jid(child)}", params={"purge": "true"})
    assert again.status_code == 200
    gone = client.get(f"/v1/job/{jid(child)}")
    assert (gone.status_code, gone.text) == (404, "job not found")


@pytest.mark.docker
def test_idempotency_token_returns_the_existing_child(client: httpx.Client) -> None:
    """Re-dispatching with the same ?idempotency_token returns the same child job."""
    job_id = register(client, [task("main", "pass")])
    first = dispatch(client, job_id, idempotency_token="tok-1").json()
    second = dispatch(client, job_id, idempotency_token="tok-1").json()
    other = dispatch(client, job_id, idempotency_token="tok-2").json()
    assert second["DispatchedJobID"] == first["DispatchedJobID"]
    assert other["DispatchedJobID"] != first["DispatchedJobID"]
    for child in (first["DispatchedJobID"], other["DispatchedJobID"]):
        assert wait_done(client, child)["ClientStatus"] == "complete"


def test_dispatch_validation_failures_answer_500_with_nomads_text(client: httpx.Client) -> None:
    """Bad dispatches answer HTTP 500 with the text of validateDispatchRequest."""
    job_id = register(
        client,
        [task("main", "pass")],
        ParameterizedJob={"Payload": "forbidden", "MetaRequired": ["a"], "MetaOptional": ["b"]},
    )
    cases = [
        ({"meta": {}}, "Dispatch did not provide required meta keys: [a]"),
        ({"meta": {"a": "1", "zzz": "2"}}, "Dispatch request included unpermitted metadata keys"),
        ({"meta": {"a": "1"}, "payload": b"x"}, "Payload provided but forbidden"),
    ]
    for kw, text in cases:
        r = dispatch(client, job_id, kw.pop("payload", b""), **kw)
        assert r.status_code == 500
        assert text in r.text
    required = register(client, [task("main", "pass")], ParameterizedJob={"Payload": "required"})
    r = dispatch(client, required)
    assert (r.status_code, r.text) == (
        500,
        "Payload is not provided but required by parameterized job",
    )
    big = dispatch(client, required, b"x" * (16 * 1024 + 1))
    assert (big.status_code, big.text) == (500, "Payload exceeds maximum size; 16385 > 16384")
    unknown = dispatch(client, f"nomadsim-missing-{uuid.uuid4().hex[:6]}")
    assert unknown.status_code == 500
    assert "not found" in unknown.text


def test_blocking_query_returns_when_wait_elapses(client: httpx.Client) -> None:
    """A blocking list query with nothing changing answers after ~wait with an empty list."""
    job_id = register(client, [task("main", "pass")])
    first = client.get(f"/v1/job/{jid(job_id)}/allocations")
    index = int(first.headers["X-Nomad-Index"])
    started = time.monotonic()
    r = client.get(f"/v1/job/{jid(job_id)}/allocations", params={"index": index, "wait": "1s"})
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert r.json() == []
    assert 1.0 <= elapsed < 5.0


def test_blocking_query_returns_on_change(client: httpx.Client) -> None:
    """A blocking jobs query wakes up when a matching job is registered, long before wait."""
    prefix = f"nomadsim-block-{uuid.uuid4().hex[:6]}"
    index = int(client.get("/v1/jobs", params={"prefix": prefix}).headers["X-Nomad-Index"])
    seen: list[Any] = []

    def watch() -> None:
        idx = index
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not seen:
            r = client.get("/v1/jobs", params={"prefix": prefix, "index": idx, "wait": "30s"})
            idx = int(r.headers["X-Nomad-Index"])
            seen.extend(r.json())

    watcher = threading.Thread(target=watch)
    started = time.monotonic()
    watcher.start()
    r = client.put(
        "/v1/jobs",
        json={
            "Job": {
                "ID": prefix,
                "Type": "batch",
                "ParameterizedJob": {},
                "TaskGroups": [{"Name": "g", "Tasks": [task("main", "pass")]}],
            }
        },
    )
    assert r.status_code == 200, r.text
    watcher.join(timeout=25)
    assert [j["ID"] for j in seen] == [prefix]
    assert seen[0]["ParameterizedJob"] is True
    assert seen[0]["Status"] == "running"
    assert time.monotonic() - started < 20


@pytest.mark.docker
def test_event_stream_delivers_allocation_updates(client: httpx.Client) -> None:
    """The event stream (topic Allocation:<job>) carries the alloc through to complete."""
    job_id = register(client, [task("main", "print('hi')")])
    out = dispatch(client, job_id).json()
    child = out["DispatchedJobID"]
    statuses: list[str] = []
    params = {"topic": f"Allocation:{child}", "index": str(out["Index"])}
    deadline = time.monotonic() + 60
    with client.stream("GET", "/v1/event/stream", params=params) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines) == "{}"
        for line in lines:
            if time.monotonic() > deadline:
                break
            batch = json.loads(line)
            for event in batch.get("Events", []):
                assert event["Topic"] == "Allocation"
                alloc = event["Payload"]["Allocation"]
                assert alloc["JobID"] == child
                assert child in event["FilterKeys"]
                statuses.append(alloc["ClientStatus"])
            if statuses and statuses[-1] == "complete":
                break
    assert statuses[-1] == "complete"
    # The client sends alloc updates in batches (200 ms): a short task may go from
    # pending to complete with no running event between (seen on Nomad 1.6.5).
    assert set(statuses) <= {"pending", "running", "complete"}


@pytest.mark.docker
def test_oom_kill_is_reported_in_the_terminated_event(client: httpx.Client) -> None:
    """A task over its memory limit dies with exit 137 and oom_killed "true"."""
    hog = task("main", "x = bytearray(256 * 1024 * 1024)", memory=32)
    job_id = register(client, [hog])
    alloc = wait_done(client, dispatch(client, job_id).json()["DispatchedJobID"])
    details = terminated(alloc, "main")["Details"]
    assert (details["exit_code"], details["oom_killed"]) == ("137", "true")
    assert alloc["ClientStatus"] == "failed"


@pytest.mark.docker
def test_held_dispatches_stay_pending_until_released(
    client: httpx.Client, only_sim: NomadSim
) -> None:
    """With hold on, dispatches get a blocked eval and no alloc; release(n) places n of them."""
    job_id = register(client, [task("main", "pass")])
    only_sim.hold = True
    try:
        first = dispatch(client, job_id).json()
        second = dispatch(client, job_id).json()
        # hold applies when the scheduler takes the evaluation up, so keep it on till then.
        deadline = time.monotonic() + 10
        while only_sim.held < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        only_sim.hold = False
    ev = client.get(f"/v1/evaluation/{first['EvalID']}").json()
    assert ev["Status"] == "complete"
    metric = ev["FailedTGAllocs"]["run"]
    assert metric["NodesExhausted"] == 1
    assert metric["DimensionExhausted"] == {"memory": 1}
    blocked = client.get(f"/v1/evaluation/{ev['BlockedEval']}").json()
    assert blocked["Status"] == "blocked"
    child = first["DispatchedJobID"]
    assert client.get(f"/v1/job/{jid(child)}").json()["Status"] == "pending"
    assert client.get(f"/v1/job/{jid(child)}/allocations").json() == []
    summary = client.get(f"/v1/job/{jid(child)}/summary").json()
    assert summary["Summary"]["run"]["Queued"] == 1
    assert client.get(f"/v1/job/{jid(job_id)}/summary").json()["Children"]["Pending"] == 2

    assert only_sim.release(1) == 1
    assert wait_done(client, child)["ClientStatus"] == "complete"
    assert client.get(f"/v1/evaluation/{ev['BlockedEval']}").json()["Status"] == "complete"
    other = second["DispatchedJobID"]
    client.delete(f"/v1/job/{jid(other)}")
    assert only_sim.release(1) == 0
    evals = client.get(f"/v1/job/{jid(other)}/evaluations").json()
    assert "cancelled" in [e["Status"] for e in evals]


def finished_eval(client: httpx.Client, eval_id: str) -> dict[str, Any]:
    """Follow an evaluation with blocking queries until the scheduler is done with it."""
    index, ev = 0, {"Status": "pending"}
    deadline = time.monotonic() + 20
    while ev["Status"] == "pending" and time.monotonic() < deadline:
        r = client.get(f"/v1/evaluation/{eval_id}", params={"index": index, "wait": "2s"})
        index, ev = int(r.headers["X-Nomad-Index"]), r.json()
    return ev


def test_unsatisfiable_constraint_fails_placement(client: httpx.Client) -> None:
    """A constraint no node meets ends the eval with ConstraintFiltered and a blocked eval."""
    constraint = {"LTarget": "${attr.kernel.name}", "RTarget": "windows", "Operand": "="}
    job_id = register(client, [task("main", "pass")], Constraints=[constraint])
    ev = finished_eval(client, dispatch(client, job_id).json()["EvalID"])
    assert ev["Status"] == "complete"
    metric = ev["FailedTGAllocs"]["run"]
    assert "${attr.kernel.name} = windows" in metric["ConstraintFiltered"]
    assert metric["NodesFiltered"] >= 1
    assert client.get(f"/v1/evaluation/{ev['BlockedEval']}").json()["Status"] == "blocked"


def test_group_bigger_than_the_node_is_never_placed(
    client: httpx.Client, only_sim: NomadSim
) -> None:
    """A memory or CPU demand above the node's capacity fails placement on that dimension."""
    job_id = register(client, [task("main", "pass", memory=NODE_MEMORY_MB + 1)])
    ev = finished_eval(client, dispatch(client, job_id).json()["EvalID"])
    assert ev["FailedTGAllocs"]["run"]["DimensionExhausted"] == {"memory": 1}
    only_sim.node_cpu_mhz, cpu = 50, only_sim.node_cpu_mhz
    try:
        small = register(client, [task("main", "pass")])
        cpu_ev = finished_eval(client, dispatch(client, small).json()["EvalID"])
    finally:
        only_sim.node_cpu_mhz = cpu
    assert cpu_ev["FailedTGAllocs"]["run"]["DimensionExhausted"] == {"cpu": 1}
    assert ev["BlockedEval"]
    assert only_sim.release(10) == 0


def test_fault_switches_fail_dispatch_and_stop_listening(
    client: httpx.Client, only_sim: NomadSim
) -> None:
    """fail_dispatch makes dispatch answer 500; set_reachable(False) refuses connections."""
    job_id = register(client, [task("main", "pass")])
    only_sim.fail_dispatch("rpc error: No cluster leader")
    try:
        r = dispatch(client, job_id)
    finally:
        only_sim.fail_dispatch(None)
    assert (r.status_code, r.text) == (500, "rpc error: No cluster leader")
    only_sim.set_reachable(False)
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{only_sim.address}/v1/status/leader", timeout=2)
    finally:
        only_sim.set_reachable(True)
    assert client.get("/v1/status/leader").status_code == 200
    assert client.get(f"/v1/job/{jid(job_id)}").status_code == 200


@pytest.mark.skipif(bool(REAL_NOMAD), reason="starts a double of its own with ACLs on")
def test_acl_token_is_enforced_when_configured() -> None:
    """With a token, requests without one get 403 "Permission denied"."""
    with NomadSim(token="secret-token") as acl:
        assert httpx.get(f"{acl.address}/v1/jobs").text == "Permission denied"
        wrong = httpx.get(f"{acl.address}/v1/jobs", headers={"X-Nomad-Token": "nope"})
        assert (wrong.status_code, wrong.text) == (403, "ACL token not found")
        ok = httpx.get(f"{acl.address}/v1/jobs", headers={"X-Nomad-Token": "secret-token"})
        assert ok.status_code == 200
        assert ok.json() == []


def test_node_and_agent_endpoints_describe_one_docker_node(client: httpx.Client) -> None:
    """/v1/nodes lists a ready node with a healthy docker driver; /v1/node/<id> has attrs."""
    nodes = client.get("/v1/nodes").json()
    assert nodes
    stub = nodes[0]
    assert stub["Status"] == "ready"
    assert stub["Drivers"]["docker"]["Healthy"] is True
    node = client.get(f"/v1/node/{stub['ID']}").json()
    assert node["Attributes"]["kernel.name"] == "linux"
    assert client.get("/v1/agent/self").status_code == 200
    missing = client.get(f"/v1/allocation/{uuid.uuid4()}")
    assert (missing.status_code, missing.text) == (404, "alloc not found")


@pytest.mark.docker
def test_docker_option_the_double_cannot_honour_fails_the_task(
    client: httpx.Client, only_sim: NomadSim
) -> None:
    """A docker option the double does not carry out fails the task instead of being ignored."""
    job_id = register(client, [task("main", "pass", config={"privileged": True})])
    alloc = wait_done(client, dispatch(client, job_id).json()["DispatchedJobID"])
    assert alloc["ClientStatus"] == "failed"
    assert events(alloc, "main")[-2:] == ["Driver Failure", "Not Restarting"]
    failure = alloc["TaskStates"]["main"]["Events"][-2]
    assert "privileged" in failure["Details"]["driver_error"]


@pytest.mark.docker
def test_a_lost_node_leaves_the_alloc_lost_without_poststop(
    client: httpx.Client, only_sim: NomadSim
) -> None:
    """fail_dispatch(times=1) fails one dispatch; lose() marks a running alloc lost."""
    main = task("main", "import time; time.sleep(120)")
    post = task("post", "print('never')", "poststop")
    job_id = register(client, [main, post])
    only_sim.fail_dispatch("rpc error: EOF", times=1)
    assert dispatch(client, job_id).status_code == 500
    child = dispatch(client, job_id).json()["DispatchedJobID"]
    stub = wait_running(client, child, "main")
    only_sim.lose(stub["ID"])
    alloc = client.get(f"/v1/allocation/{stub['ID']}").json()
    assert (alloc["ClientStatus"], alloc["DesiredStatus"]) == ("lost", "stop")
    assert alloc["TaskStates"]["main"]["State"] == "running"
    assert alloc["TaskStates"]["post"]["State"] == "pending"
    assert client.get(f"/v1/job/{jid(child)}").json()["Status"] == "dead"


def test_many_long_polls_and_one_stream_follow_hundreds_of_jobs(
    client: httpx.Client, only_sim: NomadSim
) -> None:
    """200 held dispatches: 200 concurrent long-polls and one event stream all see the stops."""
    n = 200
    job_id = register(client, [task("main", "pass")])
    only_sim.hold = True
    try:
        children = [dispatch(client, job_id).json()["DispatchedJobID"] for _ in range(n)]
        deadline = time.monotonic() + 30
        while only_sim.held < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        only_sim.hold = False
    # Each list answers with its own table's index: take the evaluations one.
    evals = client.get(f"/v1/job/{jid(children[0])}/evaluations")
    index = int(evals.headers["X-Nomad-Index"])

    async def scenario() -> tuple[int, int]:
        limits = httpx.Limits(max_connections=n + 10)
        async with httpx.AsyncClient(base_url=only_sim.address, timeout=60, limits=limits) as ac:
            cancelled: set[str] = set()

            async def stream() -> None:
                params = {"topic": "Evaluation", "index": str(index + 1)}
                async with ac.stream("GET", "/v1/event/stream", params=params) as r:
                    async for line in r.aiter_lines():
                        for event in json.loads(line).get("Events", []):
                            ev = event["Payload"]["Evaluation"]
                            if ev["Status"] == "cancelled":
                                cancelled.add(ev["JobID"])
                        if len(cancelled) >= n:
                            return

            async def poll(child: str) -> int:
                # The index is the whole evals table's: other jobs' stops wake us too.
                idx, polls = index, 0
                while polls < 2 * n:
                    r = await ac.get(
                        f"/v1/job/{jid(child)}/evaluations", params={"index": idx, "wait": "60s"}
                    )
                    idx, polls = int(r.headers["X-Nomad-Index"]), polls + 1
                    if any(e["Status"] == "cancelled" for e in r.json()):
                        return 1
                return 0

            watcher = asyncio.create_task(stream())
            polls = [asyncio.create_task(poll(child)) for child in children]
            await asyncio.sleep(0.5)

            # The stops go through the sync client: one asyncio client juggling 200 open
            # connections is slower than the double it is measuring.
            def stop_all() -> None:
                for child in children:
                    client.delete(f"/v1/job/{jid(child)}")

            await asyncio.to_thread(stop_all)
            woke = sum(await asyncio.wait_for(asyncio.gather(*polls), 90))
            await asyncio.wait_for(watcher, 90)
            return woke, len(cancelled)

    started = time.monotonic()
    assert asyncio.run(scenario()) == (n, n)
    assert time.monotonic() - started < 120  # generous: CI shares two cores


def test_invalid_job_registration_answers_500_with_the_validation_error(
    client: httpx.Client,
) -> None:
    """Register refuses a parameterized service job (500, Job.Validate's text)."""
    body = {
        "ID": f"nomadsim-bad-{uuid.uuid4().hex[:6]}",
        "Type": "service",
        "ParameterizedJob": {},
        "TaskGroups": [{"Name": "g", "Tasks": [task("main", "pass")]}],
    }
    r = client.put("/v1/jobs", json={"Job": body})
    assert r.status_code == 500
    assert 'Parameterized job can only be used with "batch" or "sysbatch" scheduler' in r.text
    assert client.put("/v1/jobs", json={}).status_code == 400


def test_plan_reports_whether_registering_would_change_the_job(client: httpx.Client) -> None:
    """/v1/job/<id>/plan with Diff: Added for a new job, None when equal, Edited on change."""
    spec = {
        "ID": f"nomadsim-plan-{uuid.uuid4().hex[:6]}",
        "Type": "batch",
        "ParameterizedJob": {"Payload": "optional"},
        "Meta": {"image": IMAGE},
        "TaskGroups": [{"Name": "g", "Tasks": [task("main", "pass")]}],
    }

    def plan(job: dict[str, Any]) -> str:
        r = client.put(f"/v1/job/{job['ID']}/plan", json={"Job": job, "Diff": True})
        assert r.status_code == 200, r.text
        kind: str = r.json()["Diff"]["Type"]
        return kind

    assert plan(spec) == "Added"
    assert client.put("/v1/jobs", json={"Job": spec}).status_code == 200
    assert plan(spec) == "None"
    assert plan({**spec, "Meta": {"image": "other:tag"}}) == "Edited"


@pytest.mark.docker
@pytest.mark.skipif(bool(REAL_NOMAD), reason="starts a double of its own with gc_max_allocs=1")
def test_client_gc_removes_old_terminal_allocs_and_their_logs() -> None:
    """Past gc_max_allocs, the client drops the oldest terminal alloc: its logs 404."""
    with (
        NomadSim(client_gc_max_allocs=1) as small,
        httpx.Client(base_url=small.address, timeout=60) as c,
    ):
        job_id = register(c, [task("main", "print('hello')")])
        first = wait_done(c, dispatch(c, job_id).json()["DispatchedJobID"])
        assert logs(c, first["ID"], "main", type="stdout", plain="true").text == "hello\n"
        second = wait_done(c, dispatch(c, job_id).json()["DispatchedJobID"])
        gone = logs(c, first["ID"], "main", type="stdout", plain="true")
        assert (gone.status_code, gone.text) == (404, f'Unknown allocation "{first["ID"]}"')
        assert c.get(f"/v1/allocation/{first['ID']}").json()["ClientStatus"] == "complete"
        kept = logs(c, second["ID"], "main", type="stdout", plain="true")
        assert kept.text == "hello\n"


def test_client_updates_between_two_syncs_reach_the_servers_as_one(only_sim: NomadSim) -> None:
    """The double batches client updates as Nomad's client does: states a task passes
    through between two syncs never show up (no running event for a short task)."""
    cluster = only_sim.cluster
    alloc_id = "00000000-0000-0000-0000-00000000c0a1"
    with cluster.state.lock:
        cluster.state.allocs[alloc_id] = {
            "ID": alloc_id,
            "Namespace": "default",
            "JobID": "no-such-job",
            "ClientStatus": "pending",
            "TaskStates": {},
        }
    before = cluster.state.index
    running = {"main": {"State": "running"}}
    dead = {"main": {"State": "dead"}}
    cluster.update_task_states(alloc_id, running, "running", "Tasks are running")
    cluster.update_task_states(alloc_id, dead, "complete", "All tasks have completed")
    cluster.sync_allocs()
    with cluster.state.lock:
        alloc = cluster.state.allocs.pop(alloc_id)
    assert (alloc["ClientStatus"], alloc["TaskStates"]) == ("complete", dead)
    assert cluster.state.index == before + 1  # one commit, one event


@pytest.mark.docker
def test_followed_logs_stream_new_output_while_the_task_runs(client: httpx.Client) -> None:
    """follow=true delivers output as the task writes it and stays open until we hang up."""
    code = (
        "import time\nprint('a', flush=True)\ntime.sleep(1)\nprint('b', flush=True)\ntime.sleep(60)"
    )
    job_id = register(client, [task("main", code)])
    child = dispatch(client, job_id).json()["DispatchedJobID"]
    stub = wait_running(client, child, "main")
    params = {"task": "main", "type": "stdout", "plain": "true", "follow": "true"}
    seen = b""
    deadline = time.monotonic() + 30
    with client.stream("GET", f"/v1/client/fs/logs/{stub['ID']}", params=params) as r:
        assert r.status_code == 200
        # Decoded: Nomad gzips the stream when the client accepts it (httpx does), flushing
        # each write; the raw bytes never equal the output (seen on Nomad 1.6.5).
        assert r.headers.get("Content-Encoding") == "gzip"
        for chunk in r.iter_bytes():
            seen += chunk
            if seen == b"a\nb\n" or time.monotonic() > deadline:
                break
    assert seen == b"a\nb\n"
    client.delete(f"/v1/job/{jid(child)}")
    assert wait_done(client, child)["DesiredStatus"] == "stop"
