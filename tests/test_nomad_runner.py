"""NomadRunner against a scripted Nomad (httpx.MockTransport): dispatch, watch, reconnect."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import httpx
import pytest

from pyexec.errors import BackendError, BackendUnavailable, BadRequest
from pyexec.models import Execution, Reason, new_execution_id, parse_request
from pyexec.runner.nomad import NomadRunner
from pyexec.runner.nomad_http import NomadAPI
from pyexec.settings import Settings, SettingsError

pytestmark = pytest.mark.anyio

CHILD = "pyexec-runner-small/dispatch-1700000000-0a1b2c3d"
STARTED = "2026-01-02T03:04:05.000000001Z"


def alloc(*, dead: bool) -> dict[str, Any]:
    state = "dead" if dead else "running"
    return {
        "ID": "alloc-1",
        "JobID": CHILD,
        "ClientStatus": "complete" if dead else "running",
        "DesiredStatus": "run",
        "ModifyIndex": 9 if dead else 7,
        "CreateIndex": 6,
        "TaskStates": {
            "run": {"State": state, "StartedAt": STARTED},
            "finish": {"State": state, "StartedAt": STARTED if dead else "0001-01-01T00:00:00Z"},
        },
    }


class ScriptedNomad:
    """Answers the calls NomadRunner makes; the event stream breaks after its first batch."""

    def __init__(self) -> None:
        self.streams: list[httpx.Request] = []
        self.dispatches: list[httpx.Request] = []
        self.fail_dispatch: tuple[int, str] | None = None

    def finished(self) -> bool:
        """Whether the run task has written its results (by the second stream)."""
        return len(self.streams) > 1

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/jobs" and request.method == "GET":
            return httpx.Response(200, json=[], headers={"X-Nomad-Index": "5"})
        if path.endswith("/dispatch"):
            self.dispatches.append(request)
            if self.fail_dispatch:
                return httpx.Response(self.fail_dispatch[0], text=self.fail_dispatch[1])
            return httpx.Response(200, json={"DispatchedJobID": CHILD, "EvalID": "e1"})
        if path == "/v1/event/stream":
            self.streams.append(request)
            lines = [{}]
            if len(self.streams) == 1:
                event = {
                    "Topic": "Allocation",
                    "Type": "PlanResult",
                    "Key": "alloc-1",
                    "Payload": {"Allocation": alloc(dead=False)},
                }
                lines.append({"Index": 7, "Events": [event]})
            # The stream then ends, as when an agent restarts.
            return httpx.Response(200, content="".join(json.dumps(x) + "\n" for x in lines))
        if path == f"/v1/job/{CHILD}/allocations":
            # Nothing placed until the first stream broke; finished by the second.
            placed = len(self.streams) > 1
            return httpx.Response(200, json=[{"ID": "alloc-1", "CreateIndex": 6}] if placed else [])
        if path == f"/v1/job/{CHILD}":
            return httpx.Response(200, json={"ID": CHILD, "Stop": False})
        if path == f"/v1/job/{CHILD}/evaluations":
            return httpx.Response(200, json=[])
        if path == "/v1/allocation/alloc-1":
            return httpx.Response(200, json=alloc(dead=True))
        results = {
            "alloc/data/pyexec/stdout": b"hello\n",
            "alloc/data/pyexec/stderr": b"",
            "alloc/data/pyexec/verdict.json": b'{"reason": "exited", "exit_code": 0}',
        }
        if path == "/v1/client/fs/ls/alloc-1":
            if not self.finished():
                return httpx.Response(404, text="open /x/alloc/data/pyexec: no such file")
            rows = [
                {"Name": name.rsplit("/", 1)[1], "IsDir": False, "Size": len(data)}
                for name, data in results.items()
            ]
            return httpx.Response(200, json=rows)
        if path == "/v1/client/fs/readat/alloc-1":
            data = results.get(request.url.params["path"]) if self.finished() else None
            if data is None:  # Nomad 1.6.5 answers a failed read with 200 and the error
                return httpx.Response(200, text="stat /x: no such file or directory")
            return httpx.Response(200, content=data[: int(request.url.params["limit"])])
        return httpx.Response(404, text=f"no route {path}")


def make_runner(nomad: ScriptedNomad) -> NomadRunner:
    settings = Settings(
        nomad_addr="http://nomad.test:4646",
        default_image="img:1",
        default_memory_mb=256,
        default_disk_mb=64,
    )
    return NomadRunner(settings, NomadAPI(settings, transport=httpx.MockTransport(nomad)))


async def test_dispatch_sends_the_idempotency_token_in_the_query() -> None:
    """Dispatch carries the execution id in the meta and as the query's idempotency token."""
    nomad = ScriptedNomad()
    runner = make_runner(nomad)
    settings = runner.settings
    record = Execution(execution_id=new_execution_id())
    started: list[datetime] = []

    async def on_running(at: datetime) -> None:
        started.append(at)

    try:
        await runner.start(record, parse_request({}, settings), _no_tar(), on_running)
        outcome = await runner.wait(record.execution_id, 10)
    finally:
        await runner.aclose()
    (dispatch,) = nomad.dispatches
    assert dispatch.url.path == "/v1/job/pyexec-runner-small/dispatch"
    assert dispatch.url.params["idempotency_token"] == record.execution_id
    body = json.loads(dispatch.content)
    assert body["Meta"] == {
        "execution_id": record.execution_id,
        "image": "img:1",
        "result_writer": "service",
    }
    assert "IdempotencyToken" not in body
    assert (outcome.reason, outcome.exit_code, outcome.stdout) == (Reason.EXITED, 0, "hello\n")
    assert len(started) == 1


async def test_watcher_resumes_from_the_last_index_and_reconciles() -> None:
    """After the stream breaks, one new stream resumes at the last index; a re-read of the
    run catches what happened in between."""
    nomad = ScriptedNomad()
    runner = make_runner(nomad)
    record = Execution(execution_id=new_execution_id())

    async def on_running(at: datetime) -> None:
        return None

    try:
        await runner.start(record, parse_request({}, runner.settings), _no_tar(), on_running)
        outcome = await runner.wait(record.execution_id, 10)
    finally:
        await runner.aclose()
    assert outcome.reason is Reason.EXITED
    indexes = [int(r.url.params["index"]) for r in nomad.streams]
    assert indexes[:2] == [5, 7]
    topics = nomad.streams[0].url.params.get_list("topic")
    assert topics == ["Allocation:*", "Evaluation:*", "Job:*"]


async def test_dispatch_refused_is_a_backend_error_with_nomads_text() -> None:
    """A dispatch Nomad answers with 500 raises nomad_dispatch_failed carrying its message."""
    nomad = ScriptedNomad()
    nomad.fail_dispatch = (500, "Dispatch did not provide required meta keys: [execution_id]")
    runner = make_runner(nomad)
    try:
        with pytest.raises(BackendError) as caught:
            await runner.start(
                Execution(execution_id=new_execution_id()),
                parse_request({}, runner.settings),
                _no_tar(),
                _ignore,
            )
    finally:
        await runner.aclose()
    assert caught.value.code == "nomad_dispatch_failed"
    assert "required meta keys" in caught.value.message


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ({"config": {"network_disabled": False}}, "network_unavailable"),
        ({"config": {"cpu_shares": 512}}, "cpu_shares_unsupported"),
        ({"requirements_txt": "six"}, "setup_network_unavailable"),
        ({"requirements_txt": "six\n-e ./src"}, "requirement_not_wheel"),
    ],
)
async def test_what_the_runner_cannot_honour_is_refused_before_dispatch(
    metadata: dict[str, Any], code: str
) -> None:
    """check() refuses network, a CPU weight, or requirements without the installer's
    network with a 4xx code, and nothing is dispatched."""
    import attrs

    nomad = ScriptedNomad()
    runner = make_runner(nomad)
    runner.settings = attrs.evolve(runner.settings, setup_network=False, allow_network=True)
    # Parsed where the server allows it all (parse_request refuses requirements without the
    # setup network itself), so the runner's own check is what is tested.
    request = parse_request(metadata, attrs.evolve(runner.settings, setup_network=True))
    try:
        with pytest.raises(BadRequest) as checked:
            runner.check(request)
        with pytest.raises(BadRequest) as started:
            await runner.start(
                Execution(execution_id=new_execution_id()), request, _no_tar(), _ignore
            )
    finally:
        await runner.aclose()
    assert checked.value.code == started.value.code == code
    assert checked.value.status_code < 500
    assert nomad.dispatches == []


async def test_pre_commands_need_no_network_on_nomad() -> None:
    """Pre-commands run in the run task without network: accepted with setup_network off."""
    import attrs

    nomad = ScriptedNomad()
    runner = make_runner(nomad)
    runner.settings = attrs.evolve(runner.settings, setup_network=False)
    runner.check(parse_request({"pre_commands": ["true"]}, runner.settings))
    await runner.aclose()


@pytest.mark.parametrize(
    ("setup_network", "metadata", "parent"),
    [
        (False, {"pre_commands": ["true"]}, "pyexec-runner-small"),
        (True, {}, "pyexec-runner-small"),
        (True, {"pre_commands": ["true"]}, "pyexec-runner-small-setup"),
        (
            True,
            {"pre_commands": ["true"], "requirements_txt": "six"},
            "pyexec-runner-small-pip-setup",
        ),
    ],
)
async def test_only_pre_commands_with_the_setup_network_go_to_a_setup_job(
    setup_network: bool, metadata: dict[str, Any], parent: str
) -> None:
    """With PYEXEC_SETUP_NETWORK on, a request with pre_commands is dispatched to the
    class's -setup variant (-pip-setup with requirements); everything else, and every
    request with it off, to the jobs without a setup task. Pre-commands pass check."""
    import attrs

    nomad = ScriptedNomad()
    runner = make_runner(nomad)
    runner.settings = attrs.evolve(runner.settings, setup_network=setup_network)
    request = parse_request(metadata, runner.settings)
    try:
        runner.check(request)
        await runner.start(Execution(execution_id=new_execution_id()), request, _no_tar(), _ignore)
    finally:
        await runner.aclose()
    (dispatch,) = nomad.dispatches
    assert dispatch.url.path == f"/v1/job/{parent}/dispatch"


async def test_unreachable_nomad_is_runner_unavailable() -> None:
    """A connection failure raises BackendUnavailable with code runner_unavailable."""

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    settings = Settings(nomad_addr="http://nomad.test:4646")
    runner = NomadRunner(settings, NomadAPI(settings, transport=httpx.MockTransport(refuse)))
    try:
        with pytest.raises(BackendUnavailable) as caught:
            await runner.ping()
    finally:
        await runner.aclose()
    assert caught.value.code == "runner_unavailable"


async def test_killing_what_nomad_no_longer_has_succeeds() -> None:
    """Stopping a dispatched job that is gone (404) is not an error."""
    seen: list[str] = []

    def gone(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.method == "DELETE":
            return httpx.Response(404, text="job not found")
        return httpx.Response(
            200,
            json=[{"ID": CHILD, "ParentID": "pyexec-runner-small", "Meta": {"execution_id": "x"}}],
        )

    settings = Settings(nomad_addr="http://nomad.test:4646")
    runner = NomadRunner(settings, NomadAPI(settings, transport=httpx.MockTransport(gone)))
    try:
        await runner.kill("x")
        await runner.kill("not-dispatched")
    finally:
        await runner.aclose()
    assert f"DELETE /v1/job/{CHILD}" in seen


def test_tls_is_verified_with_the_configured_ca(tmp_path: Any) -> None:
    """An https Nomad address verifies TLS; a CA file that cannot be read is a settings error."""
    settings = Settings(nomad_addr="https://nomad.test:4646", nomad_cacert=str(tmp_path / "no.pem"))
    with pytest.raises(SettingsError, match=r"No such file|no\.pem") as caught:
        NomadAPI(settings)
    assert caught.value.code == "invalid_setting"


def test_tls_files_with_plain_http_are_refused(tmp_path: Any) -> None:
    """TLS files with an explicit http:// Nomad address are refused, never silently unused."""
    settings = Settings(nomad_addr="http://nomad.test:4646", nomad_cacert=str(tmp_path / "ca.pem"))
    with pytest.raises(SettingsError, match="plain http") as caught:
        NomadAPI(settings, transport=httpx.MockTransport(ScriptedNomad()))
    assert caught.value.code == "invalid_setting"


def test_tls_files_make_a_bare_address_https(tmp_path: Any) -> None:
    """With TLS files, a NOMAD_ADDR without a scheme means https."""
    settings = Settings(nomad_addr="nomad.test:4646", nomad_cacert=str(tmp_path / "ca.pem"))
    api = NomadAPI(settings, transport=httpx.MockTransport(ScriptedNomad()))
    assert api.base_url == "https://nomad.test:4646"
    assert NomadAPI(Settings(nomad_addr="nomad.test:4646")).base_url == "http://nomad.test:4646"


async def _ignore(at: datetime) -> None:
    return None


async def _no_tar() -> Any:
    raise AssertionError("the Nomad runner must not read the tar")
    yield b""  # pragma: no cover - makes this an async generator


class StuckRun(ScriptedNomad):
    """A run that never ends by itself: placed and running until its job is stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def finished(self) -> bool:
        return self.stopped

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if request.method == "DELETE" and path == f"/v1/job/{CHILD}":
            self.stopped = True
            return httpx.Response(200, json={"EvalID": "e2"})
        if path == "/v1/event/stream":
            self.streams.append(request)
            return httpx.Response(200, content="{}\n")  # subscribe, then the stream ends
        if path == f"/v1/job/{CHILD}/allocations":
            return httpx.Response(200, json=[{"ID": "alloc-1", "CreateIndex": 6}])
        if path == "/v1/allocation/alloc-1":
            current = alloc(dead=self.stopped)
            if self.stopped:
                current["DesiredStatus"] = "stop"
            return httpx.Response(200, json=current)
        return super().__call__(request)


async def test_server_side_deadline_stops_a_run_that_overstays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run still going past its timeout (plus slack) is stopped and reported as timeout."""
    from pyexec import deadline

    monkeypatch.setattr(deadline, "SLACK_SECONDS", 0.0)
    scripted = StuckRun()
    runner = make_runner(scripted)
    request = parse_request({"config": {"timeout_seconds": 1}}, runner.settings)
    record = Execution(execution_id=new_execution_id())
    try:
        await runner.start(record, request, _no_tar(), _ignore)
        outcome = await runner.wait(record.execution_id, 30)
    finally:
        await runner.aclose()
    assert scripted.stopped
    assert outcome.reason is Reason.TIMEOUT
    assert "server-side deadline" in (outcome.error or "")
    assert outcome.stdout == "hello\n"


async def test_kill_finds_a_job_dispatched_after_the_last_listing() -> None:
    """Killing an execution another replica dispatched after a cached listing still stops it."""
    listed: list[dict[str, Any]] = []
    deleted: list[str] = []

    def nomad(request: httpx.Request) -> httpx.Response:
        if request.method == "DELETE":
            deleted.append(request.url.path)
            return httpx.Response(200, json={"EvalID": "e9"})
        return httpx.Response(200, json=listed)

    settings = Settings(nomad_addr="http://nomad.test:4646")
    runner = NomadRunner(settings, NomadAPI(settings, transport=httpx.MockTransport(nomad)))
    try:
        await runner.kill("exe-late")  # lists: nothing yet
        listed.append(
            {"ID": CHILD, "ParentID": "pyexec-runner-small", "Meta": {"execution_id": "exe-late"}}
        )
        await runner.kill("exe-late")  # within the listing's lifetime
    finally:
        await runner.aclose()
    assert deleted == [f"/v1/job/{CHILD}"]


class OneRunUnreadable(ScriptedNomad):
    """Events arrive, but re-reading the run's allocations keeps failing with a 500."""

    def finished(self) -> bool:
        return True  # the first event already shows the run task dead

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/event/stream":
            self.streams.append(request)
            event = {
                "Topic": "Allocation",
                "Type": "AllocationUpdated",
                "Key": "alloc-1",
                "Payload": {"Allocation": alloc(dead=True)},
            }
            lines = [{}, {"Index": 9, "Events": [event]}]
            return httpx.Response(200, content="".join(json.dumps(x) + "\n" for x in lines))
        if path == f"/v1/job/{CHILD}/allocations":
            return httpx.Response(500, text="rpc error: something went wrong")
        return super().__call__(request)


async def test_a_run_that_cannot_be_reread_does_not_stall_the_stream() -> None:
    """A failing re-read of one run leaves the event stream flowing: the run still concludes."""
    nomad = OneRunUnreadable()
    runner = make_runner(nomad)
    record = Execution(execution_id=new_execution_id())
    try:
        await runner.start(record, parse_request({}, runner.settings), _no_tar(), _ignore)
        outcome = await runner.wait(record.execution_id, 5)
    finally:
        await runner.aclose()
    assert (outcome.reason, outcome.exit_code, outcome.stdout) == (Reason.EXITED, 0, "hello\n")


async def test_a_dispatch_whose_answer_is_lost_leaves_no_job_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dispatch that landed but never answered fails start and stops the job it made."""
    from pyexec.runner import nomad as nomad_module

    monkeypatch.setattr(nomad_module, "DISPATCH_RETRY_DELAYS", (0.0, 0.0))
    record = Execution(execution_id=new_execution_id())
    landed: list[dict[str, Any]] = []
    deleted: list[str] = []

    def nomad(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/dispatch"):
            stub = {"ID": CHILD, "ParentID": "pyexec-runner-small"}
            landed[:] = [dict(stub, Meta={"execution_id": record.execution_id})]
            raise httpx.ReadTimeout("the answer never came", request=request)
        if request.method == "DELETE":
            deleted.append(request.url.path)
            return httpx.Response(200, json={"EvalID": "e3"})
        return httpx.Response(200, json=landed, headers={"X-Nomad-Index": "5"})

    settings = Settings(nomad_addr="http://nomad.test:4646")
    runner = NomadRunner(settings, NomadAPI(settings, transport=httpx.MockTransport(nomad)))
    try:
        with pytest.raises(BackendUnavailable):
            await runner.start(record, parse_request({}, settings), _no_tar(), _ignore)
    finally:
        await runner.aclose()
    assert deleted == [f"/v1/job/{CHILD}"]


async def test_watcher_survives_an_unexpected_error() -> None:
    """A bug while handling the stream costs the watcher a reconnect, not its life."""
    import asyncio

    from pyexec.runner.nomad_watch import EventWatcher

    settings = Settings(nomad_addr="http://nomad.test:4646")
    api = NomadAPI(settings, transport=httpx.MockTransport(ScriptedNomad()))
    calls = 0

    async def reconcile() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in handling one answer")

    watcher = EventWatcher(api, on_event=lambda event: None, reconcile=reconcile, index_prefix="p")
    watcher.start()
    try:
        await asyncio.wait_for(watcher.connected.wait(), 5)
    finally:
        await watcher.aclose()
        await api.aclose()
    assert calls >= 2


async def test_a_finished_runs_job_is_purged_after_a_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once a run's outcome is handed over, its dispatched job is purged from Nomad later."""
    import asyncio

    from pyexec.runner import nomad as nomad_module

    monkeypatch.setattr(nomad_module, "PURGE_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(nomad_module, "TICK_SECONDS", 0.05)
    purged: list[str] = []

    class Recording(ScriptedNomad):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.method == "DELETE":
                purged.append(f"{request.url.path}?purge={request.url.params.get('purge')}")
                return httpx.Response(200, json={"EvalID": ""})
            return super().__call__(request)

    runner = make_runner(Recording())
    record = Execution(execution_id=new_execution_id())
    try:
        await runner.start(record, parse_request({}, runner.settings), _no_tar(), _ignore)
        assert not purged  # nothing is purged while the run is followed
        await runner.wait(record.execution_id, 10)
        for _ in range(100):
            if purged:
                break
            await asyncio.sleep(0.05)
    finally:
        await runner.aclose()
    assert purged == [f"/v1/job/{CHILD}?purge=true"]


async def test_a_run_whose_wait_timed_out_is_let_go_once_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run ``wait`` gave up on is still followed to its end, then dropped and purged."""
    import asyncio

    from pyexec.runner import nomad as nomad_module

    monkeypatch.setattr(nomad_module, "PURGE_AFTER_SECONDS", 0.0)
    monkeypatch.setattr(nomad_module, "TICK_SECONDS", 0.05)
    deletes: list[str] = []

    class Recording(StuckRun):
        def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.method == "DELETE":
                deletes.append(str(request.url.params.get("purge")))
            return super().__call__(request)

    runner = make_runner(Recording())
    record = Execution(execution_id=new_execution_id())
    try:
        await runner.start(record, parse_request({}, runner.settings), _no_tar(), _ignore)
        with pytest.raises(TimeoutError):
            await runner.wait(record.execution_id, 0.1)
        await runner.kill(record.execution_id)
        for _ in range(200):
            if "true" in deletes:
                break
            await asyncio.sleep(0.05)
    finally:
        await runner.aclose()
    assert deletes == ["None", "true"]


async def test_a_placement_failure_that_arrives_before_start_tracks_the_run_is_kept() -> None:
    """A dispatch's failed evaluation and the blocked one it creates can both arrive before
    start() tracks the run: the placement failure is kept (it was lost, flakily, when only
    the latest event per topic was)."""
    runner = make_runner(ScriptedNomad())
    failed = {
        "ID": "e1",
        "JobID": CHILD,
        "Status": "complete",
        "BlockedEval": "e2",
        "FailedTGAllocs": {"pyexec": {"NodesEvaluated": 1, "DimensionExhausted": {"memory": 1}}},
    }
    blocked = {"ID": "e2", "JobID": CHILD, "Status": "blocked", "FailedTGAllocs": None}
    for evaluation in (failed, blocked):
        runner._on_event(
            {"Topic": "Evaluation", "Key": evaluation["ID"], "Payload": {"Evaluation": evaluation}}
        )
    try:
        runner._track(new_execution_id(), CHILD, 60.0, 1024, None)
        (run,) = runner._runs.values()
        assert "not enough memory" in (run.placement or "")
    finally:
        await runner.aclose()


class PrintingRun(ScriptedNomad):
    """A run whose task is still running: its first listing shows part of the output,
    the next ones all of it and the verdict. Records every file read."""

    def __init__(self) -> None:
        super().__init__()
        self.listings = 0
        self.reads: list[tuple[str, int, int]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/event/stream" and self.streams:
            return httpx.Response(200, content="{}\n")  # no event says the task ended
        if path == "/v1/allocation/alloc-1":
            return httpx.Response(200, json=alloc(dead=False))
        early = self.listings < 2
        results = {
            "stdout": b"hel" if early else b"hello\n",
            "stderr": b"" if early else b"oops\n",
            **({} if early else {"verdict.json": b'{"reason": "exited", "exit_code": 0}'}),
        }
        if path == "/v1/client/fs/ls/alloc-1":
            self.listings += 1
            rows = [{"Name": n, "IsDir": False, "Size": len(d)} for n, d in results.items()]
            return httpx.Response(200, json=rows)
        if path == "/v1/client/fs/readat/alloc-1":
            params = request.url.params
            offset, limit = int(params["offset"]), int(params["limit"])
            name = params["path"].rsplit("/", 1)[1]
            self.reads.append((name, offset, limit))
            return httpx.Response(200, content=results[name][offset : offset + limit])
        return super().__call__(request)


async def test_the_outcome_reads_only_what_live_output_has_not() -> None:
    """Once the verdict is listed, the outcome reads the verdict and only the output the
    live-output poller has not read yet (each byte once, handed to on_output once)."""
    nomad = PrintingRun()
    runner = make_runner(nomad)
    record = Execution(execution_id=new_execution_id())
    streamed: list[tuple[str, bytes]] = []

    async def on_running(at: datetime) -> None:
        pass

    try:
        await runner.start(
            record,
            parse_request({}, runner.settings),
            _no_tar(),
            on_running,
            on_output=lambda stream, data: streamed.append((stream, data)),
        )
        outcome = await runner.wait(record.execution_id, 10)
    finally:
        await runner.aclose()
    assert (outcome.reason, outcome.stdout, outcome.stderr) == (Reason.EXITED, "hello\n", "oops\n")
    assert streamed == [("stdout", b"hel"), ("stdout", b"lo\n"), ("stderr", b"oops\n")]
    assert sorted(nomad.reads) == [
        ("stderr", 0, 5),
        ("stdout", 0, 3),
        ("stdout", 3, 3),
        ("verdict.json", 0, 36),
    ]
