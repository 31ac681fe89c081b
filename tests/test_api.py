"""The HTTP API's contract, over a runner that runs nothing (sandboxing is tested elsewhere)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import tarfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

# Imported up front: the launch-grace tests time the app's start-up, not the first import
# of its modules (seconds on a loaded machine).
import pyexec.api.app  # noqa: F401
from pyexec.errors import BackendUnavailable
from pyexec.models import Execution, Reason, new_execution_id
from pyexec.store.memory import MemoryStore

from .conftest import app_client, make_settings
from .fakes import FakeRunner, replace_record
from .tarfiles import make_tar

pytestmark = pytest.mark.anyio

HELLO = make_tar({"main.py": "print('hello')\n"})


def upload(tar: bytes = HELLO, metadata: Any = None) -> dict[str, Any]:
    files: dict[str, Any] = {"tar": ("code.tar", tar, "application/x-tar")}
    data = {} if metadata is None else {"metadata": json.dumps(metadata)}
    return {"files": files, "data": data}


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
async def api(runner: FakeRunner) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as client:
        yield client


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def test_sync_returns_the_finished_record(api: httpx.AsyncClient) -> None:
    """A sync run answers 200 with the terminal record in the established shape."""
    response = await api.post("/api/v1/exec/sync", **upload(metadata={"stdin": "hi"}))
    assert response.status_code == 200
    body = response.json()
    assert body["execution_id"].startswith("exe_")
    assert body["status"] == "completed"
    assert body["reason"] == "exited"
    assert body["exit_code"] == 0
    assert body["stdout"] == "hi"
    for key in ("stderr", "started_at", "finished_at", "duration_ms", "error", "output_truncated"):
        assert key in body


async def test_the_runner_receives_the_uploaded_tar(
    api: httpx.AsyncClient, runner: FakeRunner
) -> None:
    """The runner streams back exactly the bytes that were uploaded."""
    body = (await api.post("/api/v1/exec/sync", **upload())).json()
    assert runner.tars[body["execution_id"]] == HELLO


async def test_async_then_poll(api: httpx.AsyncClient) -> None:
    """An async run answers 202 with a Location; polling with wait returns the result."""
    response = await api.post("/api/v1/exec/async", **upload(metadata={"stdin": "later"}))
    assert response.status_code == 202
    execution_id = response.json()["execution_id"]
    assert response.headers["location"] == f"/api/v1/executions/{execution_id}"
    record = (await api.get(response.headers["location"], params={"wait": 5})).json()
    assert record["status"] == "completed"
    assert record["stdout"] == "later"


async def test_kill_while_running(api: httpx.AsyncClient, runner: FakeRunner) -> None:
    """DELETE on a running execution records it as killed, not failed."""
    execution_id = (
        await api.post("/api/v1/exec/async", **upload(metadata={"stdin": "hold"}))
    ).json()["execution_id"]
    await runner.wait_running(execution_id)
    assert (await api.get(f"/api/v1/executions/{execution_id}")).json()["status"] == "running"
    killed = await api.delete(f"/api/v1/executions/{execution_id}")
    assert killed.status_code == 200
    assert killed.json()["status"] == "killed"
    assert killed.json()["reason"] == "killed"
    assert runner.killed == [execution_id]
    final = (await api.get(f"/api/v1/executions/{execution_id}", params={"wait": 5})).json()
    assert final["status"] == "killed"


async def test_killing_a_finished_execution_is_a_no_op(
    api: httpx.AsyncClient, runner: FakeRunner
) -> None:
    """DELETE on a finished execution returns it unchanged and touches no runner."""
    done = (await api.post("/api/v1/exec/sync", **upload())).json()
    again = await api.delete(f"/api/v1/executions/{done['execution_id']}")
    assert again.status_code == 200
    assert again.json()["status"] == "completed"
    assert runner.killed == []


async def test_logs_of_a_running_execution(api: httpx.AsyncClient, runner: FakeRunner) -> None:
    """The logs endpoint returns the runner's output so far while it runs."""
    execution_id = (
        await api.post("/api/v1/exec/async", **upload(metadata={"stdin": "hold"}))
    ).json()["execution_id"]
    await runner.wait_running(execution_id)
    logs = (await api.get(f"/api/v1/executions/{execution_id}/logs")).json()
    assert logs == {
        "execution_id": execution_id,
        "status": "running",
        "stdout": "partial",
        "stderr": "",
        "output_truncated": False,
    }
    await api.delete(f"/api/v1/executions/{execution_id}")


@pytest.mark.parametrize(
    "path", ["/api/v1/executions/exe_00000000-0000-0000-0000-000000000000", "/api/v1/executions/x"]
)
async def test_unknown_execution_is_404(api: httpx.AsyncClient, path: str) -> None:
    """Reading an unknown or malformed execution id answers 404 execution_not_found."""
    for response in (await api.get(path), await api.delete(path), await api.get(path + "/logs")):
        assert response.status_code == 404
        assert error_code(response) == "execution_not_found"


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ({"bogus": 1}, "unknown_field"),
        ({"config": {"timeout": 5}}, "unknown_field"),
        ({"config": {"timeout_seconds": "5"}}, "invalid_field"),
        ({"config": {"timeout_seconds": True}}, "invalid_field"),
        ({"config": {"timeout_seconds": 0}}, "invalid_field"),
        ({"config": {"memory_mb": 10**6}}, "limit_exceeded"),
        ({"env_vars": ["NOEQUALS"]}, "invalid_field"),
        ({"env_vars": "A=1"}, "invalid_field"),
        ({"entrypoint": "../main.py"}, "invalid_entrypoint"),
        ({"entrypoint": "/main.py"}, "invalid_entrypoint"),
        ({"entrypoint": "missing.py"}, "entrypoint_not_found"),
        ([1, 2], "invalid_request"),
    ],
)
async def test_bad_metadata_is_400_with_a_code(
    api: httpx.AsyncClient, metadata: Any, code: str
) -> None:
    """Each kind of bad metadata answers 400 with its own stable code."""
    response = await api.post("/api/v1/exec/sync", **upload(metadata=metadata))
    assert response.status_code == 400, response.text
    assert error_code(response) == code


async def test_unknown_field_is_named(api: httpx.AsyncClient) -> None:
    """The unknown-field error names the offending field."""
    response = await api.post("/api/v1/exec/sync", **upload(metadata={"config": {"cpus": 2}}))
    assert "config.cpus" in response.json()["error"]["message"]
    assert response.json()["error"]["details"]["field"] == "config.cpus"


async def test_metadata_that_is_not_json(api: httpx.AsyncClient) -> None:
    """A metadata part that is not JSON answers 400 invalid_json."""
    files = {"tar": ("code.tar", HELLO, "application/x-tar")}
    response = await api.post("/api/v1/exec/sync", files=files, data={"metadata": "{nope"})
    assert response.status_code == 400
    assert error_code(response) == "invalid_json"


async def test_missing_tar_part(api: httpx.AsyncClient) -> None:
    """A multipart body without a tar part answers 400 missing_tar."""
    response = await api.post(
        "/api/v1/exec/sync", files={"other": ("x", b"x")}, data={"metadata": "{}"}
    )
    assert response.status_code == 400
    assert error_code(response) == "missing_tar"


async def test_not_multipart(api: httpx.AsyncClient) -> None:
    """A JSON body on the tar endpoints answers 400 unsupported_media_type."""
    response = await api.post("/api/v1/exec/sync", json={"entrypoint": "main.py"})
    assert response.status_code == 400
    assert error_code(response) == "unsupported_media_type"


async def test_tar_escaping_the_tree_is_rejected(api: httpx.AsyncClient) -> None:
    """A tar with ../ in a member name answers 400 before anything is stored or run."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("main.py", "../evil.py"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    response = await api.post("/api/v1/exec/sync", **upload(tar=buf.getvalue()))
    assert response.status_code == 400
    assert error_code(response) == "tar_path_traversal"


async def test_garbage_instead_of_a_tar(api: httpx.AsyncClient) -> None:
    """Bytes that are not a tar answer 400 tar_invalid."""
    response = await api.post("/api/v1/exec/sync", **upload(tar=b"not a tar at all" * 100))
    assert response.status_code == 400
    assert error_code(response) == "tar_invalid"


async def test_tar_over_the_size_limit_is_413(runner: FakeRunner) -> None:
    """A tar larger than max_tar_bytes answers 413 tar_too_large."""
    big = make_tar({"main.py": "x = 1\n", "blob.bin": b"\0" * 300_000})
    async with app_client(
        make_settings(max_tar_bytes=100_000), store=MemoryStore(), runner=runner
    ) as client:
        response = await client.post("/api/v1/exec/sync", **upload(tar=big))
    assert response.status_code == 413
    assert error_code(response) == "tar_too_large"


async def test_runner_unreachable_is_503_and_recorded(runner: FakeRunner) -> None:
    """A sync run whose runner cannot launch answers 503 with its code, and leaves nothing
    pending."""
    runner.fail_start = BackendUnavailable("docker is down", code="runner_unavailable")
    store = MemoryStore()
    async with app_client(make_settings(), store=store, runner=runner) as client:
        response = await client.post("/api/v1/exec/sync", **upload())
        assert response.status_code == 503
        assert error_code(response) == "runner_unavailable"
        assert await store.list_active() == []


async def test_an_async_launch_failure_lands_on_the_record(runner: FakeRunner) -> None:
    """An async submit answers 202 before the launch; a launch that fails leaves the record
    failed with the runner's reason."""
    runner.fail_start = BackendUnavailable("docker is down", code="runner_unavailable")
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as client:
        response = await client.post("/api/v1/exec/async", **upload())
        assert response.status_code == 202
        location = response.headers["location"]
        record = (await client.get(location, params={"wait": 5})).json()
    assert record["status"] == "failed"
    assert record["reason"] == "error"
    assert "docker is down" in record["error"]


async def test_async_submit_answers_before_the_launch(runner: FakeRunner) -> None:
    """``POST /exec/async`` answers 202 with a pending record while the launch still waits."""
    gate = asyncio.Event()
    launch = runner.start

    async def slow_start(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await launch(*args, **kwargs)

    runner.start = slow_start  # type: ignore[method-assign]
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as client:
        response = await client.post("/api/v1/exec/async", **upload(metadata={"stdin": "x"}))
        assert response.status_code == 202
        assert response.json()["status"] == "pending"
        location = response.headers["location"]
        assert (await client.get(location)).json()["status"] == "pending"
        gate.set()
        record = (await client.get(location, params={"wait": 5})).json()
    assert record["status"] == "completed"
    assert record["stdout"] == "x"


async def test_async_runs_count_against_the_in_flight_cap(runner: FakeRunner) -> None:
    """Async runs that are stored but not yet finished count against ``max_in_flight``."""
    settings = make_settings(max_in_flight=2)
    async with app_client(settings, store=MemoryStore(), runner=runner) as client:
        held = [
            (await client.post("/api/v1/exec/async", **upload(metadata={"stdin": "hold"})))
            for _ in range(2)
        ]
        assert [r.status_code for r in held] == [202, 202]
        refused = await client.post("/api/v1/exec/async", **upload())
        assert refused.status_code == 429
        assert error_code(refused) == "too_many_executions"
        for response in held:
            await client.delete(response.headers["location"])


async def test_unknown_route_and_method_use_the_error_shape(api: httpx.AsyncClient) -> None:
    """404 and 405 from routing carry the same JSON error shape."""
    missing = await api.get("/nope")
    assert missing.status_code == 404
    assert error_code(missing) == "not_found"
    wrong = await api.put("/api/v1/exec/sync")
    assert wrong.status_code == 405
    assert error_code(wrong) == "method_not_allowed"


async def test_health_and_version(api: httpx.AsyncClient) -> None:
    """Health reports each backend; version names the package version and backend."""
    health = await api.get("/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "checks": {"store": "ok", "runner": "ok"}}
    assert (await api.get("/health/live")).json() == {"status": "ok"}
    version = (await api.get("/api/v1/version")).json()
    assert version["backend"] == "embedded"
    assert version["version"]


async def test_health_reports_an_unreachable_runner(runner: FakeRunner) -> None:
    """A runner whose ping fails turns /health into 503 naming that backend."""

    async def down() -> None:
        raise BackendUnavailable("docker is down", code="runner_unavailable")

    runner.ping = down  # type: ignore[method-assign]
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as client:
        response = await client.get("/health")
    assert response.status_code == 503
    assert response.json()["checks"] == {"store": "ok", "runner": "docker is down"}


async def test_openapi_document_validates(api: httpx.AsyncClient) -> None:
    """/openapi.json is a valid OpenAPI 3.1 document covering every route."""
    document = (await api.get("/openapi.json")).json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    assert {
        "/api/v1/exec/sync",
        "/api/v1/exec/async",
        "/api/v1/executions/{execution_id}",
        "/api/v1/executions/{execution_id}/logs",
        "/api/v1/eval",
        "/health",
    } <= set(document["paths"])


async def test_every_api_route_is_in_the_openapi_document(api: httpx.AsyncClient) -> None:
    """The OpenAPI document cannot drift from the routes the app serves."""
    from starlette.routing import Route

    document = (await api.get("/openapi.json")).json()
    app = api.app  # type: ignore[attr-defined]
    served = {
        # A typed path parameter ({path:path}) is a plain one ({path}) in OpenAPI.
        (re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path), method.lower())
        for route in app.routes
        # /mcp speaks MCP (JSON-RPC); its tools describe themselves (tools/list).
        if isinstance(route, Route) and route.path not in {"/docs", "/openapi.json", "/mcp"}
        for method in (route.methods or ()) - {"HEAD"}
    }
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert served == documented


async def test_swagger_ui_is_served_locally(api: httpx.AsyncClient) -> None:
    """/docs loads Swagger UI from this server, never from a CDN."""
    page = await api.get("/docs")
    assert page.status_code == 200
    assert "https://" not in page.text
    asset = await api.get("/docs/static/swagger-ui-bundle.js")
    assert asset.status_code == 200
    assert len(asset.content) > 100_000


class TestAuth:
    @pytest.fixture
    async def api(self, runner: FakeRunner) -> AsyncIterator[httpx.AsyncClient]:
        settings = make_settings(api_tokens=("s3cret", "other"))
        async with app_client(settings, store=MemoryStore(), runner=runner) as client:
            yield client

    async def test_requests_without_a_token_are_401(self, api: httpx.AsyncClient) -> None:
        """With tokens configured, every endpoint but health and the API docs needs one."""
        for response in (
            await api.get("/api/v1/version"),
            await api.get("/api/v1/executions/exe_00000000-0000-0000-0000-000000000000"),
            await api.get("/metrics"),
            await api.post("/api/v1/exec/sync", **upload()),
            await api.post("/api/v1/eval", json={"code": "1"}),
            await api.get("/docsx"),
            await api.get("/openapi.json/../api/v1/version"),
        ):
            assert response.status_code == 401
            assert error_code(response) == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
        assert (await api.get("/health")).status_code == 200

    async def test_the_api_description_is_open(self, api: httpx.AsyncClient) -> None:
        """/docs, its assets and /openapi.json load without a token: a schema is no secret."""
        assert (await api.get("/openapi.json")).json()["openapi"] == "3.1.0"
        page = await api.get("/docs")
        assert page.status_code == 200
        assert "swagger-ui" in page.text
        asset = await api.get("/docs/static/swagger-ui.css")
        assert asset.status_code == 200

    async def test_a_wrong_token_is_401(self, api: httpx.AsyncClient) -> None:
        """A token that is not configured is refused."""
        response = await api.get("/api/v1/version", headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401

    async def test_a_valid_token_passes(self, api: httpx.AsyncClient) -> None:
        """Any configured token is accepted."""
        for token in ("s3cret", "other"):
            response = await api.post(
                "/api/v1/exec/sync",
                **upload(),
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 200


async def test_token_file_is_read(tmp_path: Any, runner: FakeRunner) -> None:
    """Tokens also come from a file, one per line, comments ignored."""
    path = tmp_path / "tokens"
    path.write_text("# ops\nfromfile\n\n")
    settings = make_settings(api_token_file=str(path))
    async with app_client(settings, store=MemoryStore(), runner=runner) as client:
        assert (await client.get("/api/v1/version")).status_code == 401
        ok = await client.get("/api/v1/version", headers={"Authorization": "Bearer fromfile"})
        assert ok.status_code == 200


async def test_the_janitor_deletes_finished_executions_after_the_ttl(runner: FakeRunner) -> None:
    """A finished execution older than the TTL is swept; a running one is kept."""
    store = MemoryStore()
    async with app_client(make_settings(cleanup_ttl=0), store=store, runner=runner) as client:
        done = (await client.post("/api/v1/exec/sync", **upload())).json()["execution_id"]
        held = (
            await client.post("/api/v1/exec/async", **upload(metadata={"stdin": "hold"}))
        ).json()["execution_id"]
        await runner.wait_running(held)
        # The janitor loop may have swept already (its interval is 1 s at TTL 0): either way.
        await client.app.state.service.sweep()  # type: ignore[attr-defined]
        gone = await client.get(f"/api/v1/executions/{done}")
        assert gone.status_code == 404
        assert (await client.get(f"/api/v1/executions/{held}")).json()["status"] == "running"
        await client.delete(f"/api/v1/executions/{held}")


class FlakyStore(MemoryStore):
    """A store whose listing fails until told otherwise (Consul down at start-up)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True

    async def list_active(self) -> list[Any]:
        if self.down:
            raise BackendUnavailable("consul is down", code="store_unavailable")
        return await super().list_active()


async def test_a_store_down_at_start_up_does_not_stop_the_service(runner: FakeRunner) -> None:
    """Start-up work the store refuses is retried in the background until it succeeds."""
    store = FlakyStore()
    leftover = Execution(execution_id=new_execution_id())
    await store.create(leftover, io.BytesIO(HELLO))
    settings = make_settings(launch_grace_seconds=0)
    async with app_client(settings, store=store, runner=runner) as client:
        assert (await client.get("/health/live")).status_code == 200
        assert (await store.get(leftover.execution_id)).status.value == "pending"
        store.down = False
        # The background retry adopts it; the fake runner cannot resume it, so it is lost.
        adopted = await store.wait_terminal(leftover.execution_id, timeout=15)
        assert adopted.status.value == "failed"
        assert "restarted" in (adopted.error or "")


async def test_a_failed_kill_can_be_retried(runner: FakeRunner) -> None:
    """When the runner cannot stop a run, DELETE answers 503 and a retry asks it again."""
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as client:
        execution_id = (
            await client.post("/api/v1/exec/async", **upload(metadata={"stdin": "hold"}))
        ).json()["execution_id"]
        real_kill = runner.kill

        async def unreachable(execution_id: str) -> None:
            raise BackendUnavailable("nomad is down", code="runner_unavailable")

        runner.kill = unreachable  # type: ignore[method-assign]
        failed = await client.delete(f"/api/v1/executions/{execution_id}")
        assert failed.status_code == 503
        assert error_code(failed) == "runner_unavailable"
        runner.kill = real_kill  # type: ignore[method-assign]
        retried = await client.delete(f"/api/v1/executions/{execution_id}")
        assert retried.status_code == 200
        assert retried.json()["status"] == "killed"
        assert runner.killed == [execution_id]


def test_an_unreadable_token_file_is_a_clear_settings_error(tmp_path: Any) -> None:
    """A token file that cannot be read fails with invalid_setting, naming the variable."""
    from pyexec.settings import SettingsError

    with pytest.raises(SettingsError) as info:
        make_settings(api_token_file=str(tmp_path / "missing")).tokens()
    assert info.value.code == "invalid_setting"
    assert "PYEXEC_API_TOKEN_FILE" in info.value.message


async def test_the_in_flight_cap_answers_429(runner: FakeRunner) -> None:
    """Past max_in_flight a submit is refused with 429 and Retry-After; a finished run frees
    its slot."""
    settings = make_settings(max_in_flight=1)
    async with app_client(settings, store=MemoryStore(), runner=runner) as client:
        for _ in range(2):  # each sync run gives its slot back when it answers
            assert (await client.post("/api/v1/exec/sync", **upload())).status_code == 200
        held = await client.post("/api/v1/exec/async", **upload(metadata={"stdin": "hold"}))
        assert held.status_code == 202
        refused = await client.post("/api/v1/exec/sync", **upload())
        assert refused.status_code == 429
        assert error_code(refused) == "too_many_executions"
        assert refused.headers["retry-after"] == "1"
        await client.delete(f"/api/v1/executions/{held.json()['execution_id']}")


async def test_a_young_pending_execution_is_not_declared_lost_at_start_up(
    runner: FakeRunner,
) -> None:
    """A pending execution younger than the launch grace survives a restart; if it is
    still pending (and unknown to the runner) once the grace has passed, it is lost."""
    store = MemoryStore()
    young = Execution(execution_id=new_execution_id())
    await store.create(young, io.BytesIO(HELLO))
    settings = make_settings(launch_grace_seconds=1.5)
    async with app_client(settings, store=store, runner=runner):
        assert (await store.get(young.execution_id)).status.value == "pending"
        final = await store.wait_terminal(young.execution_id, timeout=15)
        assert final.status.value == "failed"
        assert "lost" in (final.error or "")


async def test_an_execution_launched_elsewhere_during_the_grace_is_left_alone(
    runner: FakeRunner,
) -> None:
    """A young pending execution another replica starts during the grace is not touched."""
    import attrs

    from pyexec.models import Status

    store = MemoryStore()
    young = Execution(execution_id=new_execution_id())
    await store.create(young, io.BytesIO(HELLO))
    # A grace that outlasts building the app on a loaded machine (that took 0.7 s here).
    settings = make_settings(launch_grace_seconds=3)
    async with app_client(settings, store=store, runner=runner):
        running = attrs.evolve(young, status=Status.RUNNING)
        await replace_record(store, running, expect={Status.PENDING})
        # Well past the grace: the re-check saw it running and left it so.
        after = await store.wait_terminal(young.execution_id, timeout=4)
        assert after.status is Status.RUNNING


async def test_a_kill_during_the_launch_stops_the_run_that_follows(runner: FakeRunner) -> None:
    """Killed while its launch was still under way, a run that starts anyway is stopped."""
    gate = asyncio.Event()
    launch = runner.start

    async def slow_start(*args: Any, **kwargs: Any) -> None:
        await gate.wait()
        await launch(*args, **kwargs)

    runner.start = slow_start  # type: ignore[method-assign]
    async with app_client(make_settings(), store=MemoryStore(), runner=runner) as client:
        response = await client.post("/api/v1/exec/async", **upload(metadata={"stdin": "hold"}))
        execution_id = response.json()["execution_id"]
        killed = await client.delete(response.headers["location"])
        assert killed.json()["status"] == "killed"
        gate.set()
        await runner.wait_running(execution_id)
        outcome = await runner.wait(execution_id, 5)
    assert outcome.reason is Reason.KILLED
