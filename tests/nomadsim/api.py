"""The sim's HTTP face: Nomad's /v1 routes as a Starlette app.

Sources: ``command/agent/http.go`` (error → status mapping, text/plain error
bodies, ``X-Nomad-*`` headers, ``parseWait``), ``nomad/rpc.go``
(``blockingRPC``: wait until index > N or timeout, jitter of wait/16, 5 min
cap), ``command/agent/job_endpoint.go``, ``command/agent/fs_endpoint.go`` +
``client/fs_endpoint.go`` (logs), ``command/agent/event_endpoint.go`` +
``nomad/stream/ndjson.go`` + ``nomad/stream/subscription.go`` (event stream),
``api/fs.go`` (``StreamFrame``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .cluster import ApiError
from .state import Change
from .taskrunner import fmt_time

if TYPE_CHECKING:
    from .server import NomadSim

__all__ = ["Api", "Hub", "parse_go_duration"]

JSON = dict[str, Any]
MAX_BLOCK_S = 300.0  # structs.MaxBlockingRPCQueryTime / DefaultBlockingRPCQueryTime
FRAME_SIZE = 64 * 1024  # client/fs_endpoint.go streamFrameSize
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """``time.ParseDuration`` for the forms clients send (``30s``, ``5m``, ``1m30s``)."""
    if text == "0":
        return 0.0
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            raise ValueError(text)
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        raise ValueError(text)
    return total


def _dumps(value: Any) -> str:
    """Compact, like Go's encoder (no spaces after separators)."""
    return json.dumps(value, separators=(",", ":"))


def _json(body: Any, index: int | None = None, status: int = 200) -> Response:
    headers = {}
    if index is not None:
        headers = {
            "X-Nomad-Index": str(max(index, 1)),
            "X-Nomad-KnownLeader": "true",
            "X-Nomad-LastContact": "0",
        }
    return Response(
        _dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


def _error(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain")


class Hub:
    """Wakes blocking queries and feeds event streams, on the server's event loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiters: dict[Any, asyncio.Event] = {}
        self.streams: set[asyncio.Queue[tuple[int, list[JSON]] | None]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiters = {}
        self.streams = set()

    def on_commit(self, index: int, changes: list[Change], events: list[JSON]) -> None:
        loop = self.loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
            loop.call_soon_threadsafe(self._fire, index, changes, events)

    def _fire(self, index: int, changes: list[Change], events: list[JSON]) -> None:
        for change in changes:
            for key in change.watch:
                waiter = self.waiters.pop(key, None)
                if waiter is not None:
                    waiter.set()
        if events:
            for q in self.streams:
                q.put_nowait((index, events))

    def waiter(self, key: Any) -> asyncio.Event:
        waiter = self.waiters.get(key)
        if waiter is None:
            waiter = self.waiters[key] = asyncio.Event()
        return waiter

    def close_streams(self) -> None:
        for q in self.streams:
            q.put_nowait(None)


class GzipFlushing:
    """Nomad's HTTP server gzips answers for clients that accept it (NYTimes gziphandler,
    command/agent/http.go): a body under 1,400 bytes goes as it is, a longer one or a
    stream is compressed, and each write of a stream is flushed (seen on Nomad 1.6.5: a
    followed log or the event stream arrives as gzip members, promptly). Clients reading
    raw bytes see compressed data, as on a real agent."""

    MIN_SIZE = 1400

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        accepts = dict(scope.get("headers") or []).get(b"accept-encoding", b"")
        if b"gzip" not in accepts:
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        compressor: Any = None

        async def wrapped(message: Any) -> None:
            nonlocal compressor
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body, more = message.get("body", b""), message.get("more_body", False)
            if compressor is None:
                if not more and len(body) < self.MIN_SIZE:
                    await send(start)
                    await send(message)
                    return
                headers = [
                    (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
                ]
                headers += [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")]
                await send({**start, "headers": headers})
                compressor = zlib.compressobj(wbits=31)
            data = compressor.compress(body)
            data += compressor.flush(zlib.Z_SYNC_FLUSH if more else zlib.Z_FINISH)
            await send({"type": "http.response.body", "body": data, "more_body": more})

        await self.app(scope, receive, wrapped)


class Api:
    """Route handlers; each parses the request, calls the cluster, shapes Nomad's answer."""

    def __init__(self, sim: NomadSim) -> None:
        self.sim = sim
        self.cluster = sim.cluster
        self.hub = sim.hub

    # -- plumbing ------------------------------------------------------------
    def app(self) -> Starlette:
        routes = [
            Route("/v1/jobs", self.jobs, methods=["GET", "PUT", "POST"]),
            Route("/v1/job/{job_id:path}/dispatch", self.dispatch, methods=["PUT", "POST"]),
            Route("/v1/job/{job_id:path}/allocations", self.job_allocs, methods=["GET"]),
            Route("/v1/job/{job_id:path}/evaluations", self.job_evals, methods=["GET"]),
            Route("/v1/job/{job_id:path}/summary", self.job_summary, methods=["GET"]),
            Route("/v1/job/{job_id:path}/plan", self.job_plan, methods=["PUT", "POST"]),
            Route("/v1/allocations", self.allocs, methods=["GET"]),
            Route("/v1/job/{job_id:path}", self.job, methods=["GET", "PUT", "POST", "DELETE"]),
            Route("/v1/allocation/{alloc_id}", self.alloc, methods=["GET"]),
            Route("/v1/evaluation/{eval_id}", self.evaluation, methods=["GET"]),
            Route("/v1/client/fs/logs/{alloc_id}", self.logs, methods=["GET"]),
            Route("/v1/client/fs/readat/{alloc_id}", self.readat, methods=["GET"]),
            Route("/v1/client/fs/ls/{alloc_id}", self.ls, methods=["GET"]),
            Route("/v1/event/stream", self.event_stream, methods=["GET"]),
            Route("/v1/status/leader", self.leader, methods=["GET"]),
            Route("/v1/agent/self", self.agent_self, methods=["GET"]),
            Route("/v1/nodes", self.nodes, methods=["GET"]),
            Route("/v1/node/{node_id}", self.node, methods=["GET"]),
            Route("/v1/system/gc", self.system_gc, methods=["PUT"]),
        ]
        app = Starlette(
            routes=[Route(r.path, self._wrap(r.endpoint), methods=r.methods) for r in routes]
        )
        app.add_middleware(GzipFlushing)
        return app

    def _wrap(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            if self.sim.token is not None and request.url.path != "/v1/status/leader":
                given = request.headers.get("x-nomad-token", "")
                auth = request.headers.get("authorization", "")
                if not given and auth.lower().startswith("bearer "):
                    given = auth[7:].strip()
                if not given:
                    return _error(403, "Permission denied")
                if given != self.sim.token:
                    return _error(403, "ACL token not found")
            try:
                return await handler(request)
            except ApiError as exc:
                return _error(exc.status, exc.text)

        return wrapped

    @staticmethod
    def _ns(request: Request) -> str:
        return request.query_params.get("namespace") or "default"

    async def _body(self, request: Request) -> JSON:
        raw = await request.body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"failed to decode request body: {exc}") from None  # guessed
        if not isinstance(body, dict):
            raise ApiError(400, "Request decode failed")  # guessed
        return body

    async def _blocking(
        self, request: Request, watch: Any, table: str, query: Callable[[], Any]
    ) -> Response:
        """``blockingRPC``: answer when the table index passes ``index`` or ``wait`` ends."""
        params = request.query_params
        try:
            min_index = int(params.get("index") or 0)
        except ValueError:
            return _error(400, "Invalid index")
        wait = MAX_BLOCK_S
        if params.get("wait"):
            try:
                wait = parse_go_duration(params["wait"])
            except ValueError:
                return _error(400, "Invalid wait time")
            if wait <= 0 or wait > MAX_BLOCK_S:
                wait = MAX_BLOCK_S
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait + random.uniform(0, wait / 16)
        while True:
            # Take the waiter before reading, so a commit in between still wakes us.
            waiter = self.hub.waiter(watch) if min_index else None
            body = query()
            index = self.cluster.state.table_index[table]
            remaining = deadline - loop.time()
            if waiter is None or index > min_index or remaining <= 0:
                return _json(body, index)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), remaining)

    # -- jobs ------------------------------------------------------------------
    async def jobs(self, request: Request) -> Response:
        ns = self._ns(request)
        if request.method == "GET":
            prefix = request.query_params.get("prefix", "")
            meta = _parse_bool(request, "meta")
            return await self._blocking(
                request,
                ("table", "jobs"),
                "jobs",
                lambda: self.cluster.list_jobs(ns, prefix, meta),
            )
        return self._register(ns, await self._body(request), None)

    def _register(self, ns: str, body: JSON, job_id: str | None) -> Response:
        job = body.get("Job")
        if not isinstance(job, dict):
            raise ApiError(400, "Job must be specified")
        if not job.get("ID"):
            raise ApiError(400, "Job ID hasn't been provided")
        if job_id is not None and job["ID"] != job_id:
            raise ApiError(400, "Job ID does not match name")
        out = self.cluster.register(ns, job)
        return _json(out, out["Index"])

    async def job(self, request: Request) -> Response:
        ns = self._ns(request)
        job_id = request.path_params["job_id"]
        if request.method == "GET":
            return await self._blocking(
                request, ("jobs", (ns, job_id)), "jobs", lambda: self.cluster.get_job(ns, job_id)
            )
        if request.method == "DELETE":
            purge = _parse_bool(request, "purge")
            out = self.cluster.stop_job(ns, job_id, purge)
            return _json(out, out["Index"])
        return self._register(ns, await self._body(request), job_id)

    async def dispatch(self, request: Request) -> Response:
        ns = self._ns(request)
        job_id = request.path_params["job_id"]
        body = await self._body(request)
        if body.get("JobID") and body["JobID"] != job_id:
            raise ApiError(400, "Job ID does not match")
        try:
            payload = base64.b64decode(body.get("Payload") or "", validate=True)
        except ValueError as exc:
            raise ApiError(400, f"illegal base64 data: {exc}") from None  # guessed
        meta = body.get("Meta") or {}
        if not isinstance(meta, dict):
            raise ApiError(400, "Meta must be an object")  # guessed
        token = request.query_params.get("idempotency_token", "")
        out = self.cluster.dispatch(
            ns,
            job_id,
            payload,
            {str(k): str(v) for k, v in meta.items()},
            str(body.get("IdPrefixTemplate") or ""),
            token,
        )
        return _json(out, out["Index"])

    async def job_allocs(self, request: Request) -> Response:
        ns = self._ns(request)
        job_id = request.path_params["job_id"]
        return await self._blocking(
            request,
            ("job_allocs", ns, job_id),
            "allocs",
            lambda: self.cluster.alloc_stubs(ns, job_id),
        )

    async def job_evals(self, request: Request) -> Response:
        ns = self._ns(request)
        job_id = request.path_params["job_id"]
        return await self._blocking(
            request, ("job_evals", ns, job_id), "evals", lambda: self.cluster.job_evals(ns, job_id)
        )

    async def job_plan(self, request: Request) -> Response:
        body = await self._body(request)
        job = body.get("Job")
        if not isinstance(job, dict):
            raise ApiError(400, "Job must be specified")
        if not job.get("ID"):
            raise ApiError(400, "Job must have a valid ID")
        if job["ID"] != request.path_params["job_id"]:
            raise ApiError(400, "Job ID does not match")
        out = self.cluster.plan(self._ns(request), job)
        return _json(out, out["Index"])

    async def job_summary(self, request: Request) -> Response:
        ns = self._ns(request)
        job_id = request.path_params["job_id"]
        return await self._blocking(
            request,
            ("job_allocs", ns, job_id),
            "allocs",
            lambda: self.cluster.job_summary(ns, job_id),
        )

    async def allocs(self, request: Request) -> Response:
        ns = self._ns(request)
        prefix = request.query_params.get("prefix", "")
        return await self._blocking(
            request, ("table", "allocs"), "allocs", lambda: self.cluster.list_allocs(ns, prefix)
        )

    async def alloc(self, request: Request) -> Response:
        alloc_id = request.path_params["alloc_id"]
        return await self._blocking(
            request, ("allocs", alloc_id), "allocs", lambda: self.cluster.get_alloc(alloc_id)
        )

    async def evaluation(self, request: Request) -> Response:
        eval_id = request.path_params["eval_id"]
        return await self._blocking(
            request, ("evals", eval_id), "evals", lambda: self.cluster.get_eval(eval_id)
        )

    # -- files -------------------------------------------------------------------
    def _alloc_path(self, request: Request) -> Path | None:
        """The host path a client filesystem request names; ``None`` for an unknown alloc."""
        rel = request.query_params.get("path", "")
        if not rel:
            raise ApiError(400, "must provide a file path")
        runner = self.cluster.runners.get(request.path_params["alloc_id"])
        if runner is None:
            return None
        root = runner.root.resolve()
        path = (root / rel.lstrip("/")).resolve()
        if path != root and root not in path.parents:
            raise ApiError(400, "Path escapes the allocation directory")
        return path

    async def ls(self, request: Request) -> Response:
        """``GET /v1/client/fs/ls/<alloc>?path=``: ``AllocFileInfo`` rows; 404 "open <host
        path>: no such file or directory" for a missing directory (Nomad 1.6.5)."""
        path = self._alloc_path(request)
        if path is None:
            raise ApiError(404, f'Unknown allocation "{request.path_params["alloc_id"]}"')
        try:
            entries = sorted(path.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(404, f"open {path}: no such file or directory") from None
        rows = []
        for entry in entries:
            info = entry.stat()
            rows.append(
                {
                    "Name": entry.name,
                    "IsDir": entry.is_dir(),
                    "Size": info.st_size,
                    "FileMode": oct(info.st_mode & 0o777),
                    "ModTime": fmt_time(int(info.st_mtime * 1e9)),
                }
            )
        return _json(rows)

    async def readat(self, request: Request) -> Response:
        """``GET /v1/client/fs/readat/<alloc>?path=&offset=&limit=``: raw bytes of a file in
        the allocation directory. As Nomad 1.6.5 does, a read that fails (missing file,
        unknown allocation) still answers 200, with the error text as the body: the
        stream had started."""
        q = request.query_params
        try:
            offset = int(q.get("offset") or 0)
            limit = int(q.get("limit") or 0)
        except ValueError as exc:
            raise ApiError(400, f"error parsing offset/limit: {exc}") from None
        path = self._alloc_path(request)
        if path is None:
            body = f'Unknown allocation "{request.path_params["alloc_id"]}"'
            return Response(body, media_type="text/plain; charset=utf-8")
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read(limit) if limit > 0 else fh.read()
        except (FileNotFoundError, NotADirectoryError):
            body = f"stat {path}: no such file or directory"
            return Response(body, media_type="text/plain; charset=utf-8")
        return Response(data, media_type="application/octet-stream")

    # -- logs --------------------------------------------------------------------
    async def logs(self, request: Request) -> Response:
        q = request.query_params
        alloc_id = request.path_params["alloc_id"]
        task = q.get("task", "")
        if not task:
            raise ApiError(400, "must provide task name")
        follow = _parse_bool(request, "follow", "failed to parse follow field to boolean: ")
        plain = _parse_bool(request, "plain", "failed to parse plain field to boolean: ")
        kind = q.get("type", "")
        if kind not in ("stdout", "stderr"):
            raise ApiError(400, "must provide log type (stdout/stderr)")
        try:
            offset = int(q.get("offset") or 0)
        except ValueError as exc:
            raise ApiError(400, f"error parsing offset: {exc}") from None
        origin = q.get("origin") or "start"
        if origin not in ("start", "end"):
            raise ApiError(400, 'origin must be "start" or "end"')
        runner = self.cluster.runners.get(alloc_id)
        with self.cluster.state.lock:
            alloc = self.cluster.state.allocs.get(alloc_id)
            states = (alloc or {}).get("TaskStates")
        if alloc is None or runner is None or states is None:
            raise ApiError(404, f'Unknown allocation "{alloc_id}"')
        if task not in states:
            raise ApiError(400, f'unknown task name "{task}"')
        if states[task]["StartedAt"] is None:
            raise ApiError(404, f'task "{task}" not started yet. No logs available')
        path = runner.log_path(task, kind)
        rel = f"alloc/logs/{path.name}"
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # the client GC'd the alloc a moment ago
            raise ApiError(404, f'Unknown allocation "{alloc_id}"') from None
        start = offset if origin == "start" else max(size - offset, 0)
        media = "text/plain" if plain else "application/json"
        return StreamingResponse(
            self._log_chunks(request, path, rel, start, plain, follow), media_type=media
        )

    async def _log_chunks(
        self, request: Request, path: Path, rel: str, pos: int, plain: bool, follow: bool
    ) -> AsyncIterator[bytes]:
        """Frames ``{File, Offset, Data}`` back to back (no separator), or raw bytes.

        With ``follow`` the stream never ends by itself, as in client/fs_endpoint.go
        (no check of the task's state): the caller hangs up when it has what it needs.
        """
        last_beat = time.monotonic()
        while True:
            try:
                with path.open("rb") as fh:
                    fh.seek(pos)
                    data = fh.read()
            except FileNotFoundError:
                # streamFile sends a "file deleted" FileEvent when the file goes away.
                if not plain:
                    yield _dumps({"Offset": pos, "File": rel, "FileEvent": "file deleted"}).encode()
                return
            for i in range(0, len(data), FRAME_SIZE):
                chunk = data[i : i + FRAME_SIZE]
                pos += len(chunk)
                if plain:
                    yield chunk
                else:
                    yield _dumps(
                        {"Offset": pos, "Data": base64.b64encode(chunk).decode(), "File": rel}
                    ).encode()
            if not follow or await request.is_disconnected():
                return
            if not plain and time.monotonic() - last_beat > 1.0:  # streamHeartbeatRate
                last_beat = time.monotonic()
                yield b"{}"
            await asyncio.sleep(0.2)  # streamBatchWindow

    # -- events ------------------------------------------------------------------
    async def event_stream(self, request: Request) -> Response:
        try:
            start = int(request.query_params.get("index") or 0)
        except ValueError as exc:
            raise ApiError(400, f"Unable to parse index: {exc}") from None
        topics: dict[str, list[str]] = {}
        for raw in request.query_params.getlist("topic") or ["*"]:
            parts = raw.split(":")
            if len(parts) == 1:
                parts = [raw, "*"]
            elif len(parts) != 2:
                raise ApiError(
                    400,
                    "Invalid topic query: error parsing topics: Invalid key "
                    f"value pair for topic, topic: {raw}",
                )
            topics.setdefault(parts[0], []).append(parts[1])
        ns = self._ns(request)
        q: asyncio.Queue[tuple[int, list[JSON]] | None] = asyncio.Queue()
        self.hub.streams.add(q)
        backlog = self.cluster.state.events_from(start)
        return StreamingResponse(
            self._events(q, backlog, topics, ns),
            media_type="application/json",
            headers={"Cache-Control": "no-cache"},
        )

    async def _events(
        self,
        q: asyncio.Queue[tuple[int, list[JSON]] | None],
        backlog: list[tuple[int, list[JSON]]],
        topics: dict[str, list[str]],
        ns: str,
    ) -> AsyncIterator[bytes]:
        try:
            yield b"{}\n"  # ndjson.go sends a heartbeat first to confirm the subscription
            sent = 0
            for index, events in backlog:
                line = _filter(index, events, topics, ns)
                sent = index
                if line:
                    yield line
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), self.sim.heartbeat_s)
                except TimeoutError:
                    yield b"{}\n"
                    continue
                if item is None:
                    return
                index, events = item
                if index <= sent:
                    continue
                line = _filter(index, events, topics, ns)
                if line:
                    yield line
        finally:
            self.hub.streams.discard(q)

    # -- agent, nodes, misc -----------------------------------------------------------
    async def leader(self, request: Request) -> Response:
        return _json("127.0.0.1:4647")

    async def agent_self(self, request: Request) -> Response:
        return _json(
            {
                "config": {
                    "Region": "global",
                    "Datacenter": "dc1",
                    "NodeName": "nomadsim-node",
                    "Version": {
                        "Version": "1.6.5",
                        "VersionPrerelease": "",
                        "VersionMetadata": "nomadsim",
                    },
                    "ACL": {"Enabled": self.sim.token is not None},
                },
                "member": {
                    "Name": "nomadsim.global",
                    "Addr": "127.0.0.1",
                    "Port": 4648,
                    "Status": "alive",
                    "Tags": {"region": "global", "dc": "dc1", "role": "nomad", "build": "1.6.5"},
                },
                "stats": {},
            }
        )

    def _node_stub(self) -> JSON:
        node = self.cluster.node
        return {
            "ID": node["ID"],
            "Name": node["Name"],
            "Datacenter": node["Datacenter"],
            "NodeClass": "",
            "NodePool": "default",
            "Version": "1.6.5",
            "Address": "127.0.0.1",
            "Drain": False,
            "SchedulingEligibility": "eligible",
            "Status": "ready",
            "StatusDescription": "",
            "Drivers": self._drivers(),
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    def _drivers(self) -> JSON:
        return {
            "docker": {
                "Attributes": {"driver.docker": "1"},
                "Detected": True,
                "Healthy": True,
                "HealthDescription": "Healthy",
                "UpdateTime": "2026-01-01T00:00:00Z",
            }
        }

    async def nodes(self, request: Request) -> Response:
        return _json([self._node_stub()], 1)

    async def node(self, request: Request) -> Response:
        node = self.cluster.node
        if request.path_params["node_id"] not in (node["ID"], node["ID"][:8]):
            raise ApiError(404, "node not found")
        body = {
            **self._node_stub(),
            "Attributes": dict(node["Attributes"]),
            "Meta": {},
            "NodeResources": {
                "Cpu": {"CpuShares": self.cluster.node_cpu_mhz},
                "Memory": {"MemoryMB": self.cluster.node_memory_mb},
                "Disk": {"DiskMB": 100_000},
            },
            "ReservedResources": {"Cpu": {"CpuShares": 0}, "Memory": {"MemoryMB": 0}},
        }
        return _json(body, 1)

    async def system_gc(self, request: Request) -> Response:
        await asyncio.to_thread(self.cluster.gc)
        return Response(b"", status_code=200)


def _parse_bool(request: Request, field: str, prefix: str | None = None) -> bool:
    raw = request.query_params.get(field, "")
    if not raw:
        return False
    value = {
        "1": True,
        "t": True,
        "true": True,
        "True": True,
        "TRUE": True,
        "0": False,
        "f": False,
        "false": False,
        "False": False,
        "FALSE": False,
    }.get(raw)
    if value is None:
        err = f'strconv.ParseBool: parsing "{raw}": invalid syntax'
        if prefix is None:
            raise ApiError(500, f'Failed to parse value of "{field}" ({raw}) as a bool: {err}')
        raise ApiError(400, prefix + err)
    return value


def _filter(
    index: int, events: Iterable[JSON], topics: dict[str, list[str]], ns: str
) -> bytes | None:
    """Topic/key matching of ``nomad/stream/subscription.go``; None when nothing matches."""
    keep = []
    for event in events:
        keys = topics.get(event["Topic"], []) + topics.get("*", [])
        if not keys:
            continue
        if ns != "*" and event.get("Namespace", ns) != ns:
            continue
        if "*" in keys or event["Key"] in keys or any(k in keys for k in event["FilterKeys"] or []):
            keep.append(event)
    if not keep:
        return None
    return (_dumps({"Index": index, "Events": keep}) + "\n").encode()
