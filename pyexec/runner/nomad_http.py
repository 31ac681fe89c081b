"""A small async client for the parts of Nomad's HTTP API the runner uses.

httpx rather than python-nomad: python-nomad is synchronous, sends the dispatch
idempotency token in the body (Nomad reads it from the query string) and turns
TLS verification off unless told otherwise. Here TLS verification follows
``NOMAD_CACERT`` (or the system store) and is never switched off.

Errors: an unreachable agent raises ``BackendUnavailable(code="runner_unavailable")``;
an answer Nomad refuses raises ``NomadError`` (a ``BackendError``) carrying the status
and Nomad's own message.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from pyexec.errors import BackendError, BackendUnavailable
from pyexec.settings import Settings, SettingsError

__all__ = ["NomadAPI", "NomadError"]

JSON = dict[str, Any]
#: Requests other than the event stream; the stream has its own connection.
REQUEST_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
#: Blocking reads and streams: read timeout above Nomad's 30 s heartbeat.
STREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=75.0, write=30.0, pool=30.0)


class NomadError(BackendError):
    """Nomad answered with an error status; ``status`` and Nomad's text are kept."""

    default_code = "runner_error"

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message, code=code, nomad_status=status)
        self.status = status


def _ssl_context(settings: Settings) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=settings.nomad_cacert)
        if settings.nomad_client_cert:
            context.load_cert_chain(settings.nomad_client_cert, settings.nomad_client_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load Nomad TLS files: {exc}", name="NOMAD_CACERT") from None
    return context


def base_url(settings: Settings) -> str:
    """Nomad's URL from ``NOMAD_ADDR``. TLS files make a bare ``host:port`` https; with them,
    an explicit ``http://`` is refused rather than sending the token in clear."""
    addr = (settings.nomad_addr or "").strip()
    tls = any((settings.nomad_cacert, settings.nomad_client_cert, settings.nomad_client_key))
    if "://" not in addr:
        return f"{'https' if tls else 'http'}://{addr}"
    if tls and addr.lower().startswith("http://"):
        raise SettingsError(
            f"NOMAD_ADDR {addr!r} is plain http but Nomad TLS files are configured; "
            "use https:// (TLS is never turned off silently)",
            name="NOMAD_ADDR",
        )
    return addr


class NomadAPI:
    """One pooled client for calls, one more for the event stream; both opened lazily."""

    def __init__(self, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None):
        if not settings.nomad_addr:
            raise BackendError("NOMAD_ADDR is not set", code="invalid_setting")
        self.base_url = base_url(settings)
        headers = {"X-Nomad-Token": settings.nomad_token} if settings.nomad_token else {}
        params: dict[str, str] = {}
        if settings.nomad_namespace:
            params["namespace"] = settings.nomad_namespace
        if settings.nomad_region:
            params["region"] = settings.nomad_region
        self.params = params
        common: dict[str, Any] = {"base_url": self.base_url, "headers": headers}
        if transport is not None:
            common["transport"] = transport
        elif self.base_url.startswith("https://"):
            common["verify"] = _ssl_context(settings)
        # Few kept-alive connections: while runs wait, only the stream should stay open.
        self._calls = httpx.AsyncClient(
            timeout=REQUEST_TIMEOUT,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=1),
            **common,
        )
        self._stream = httpx.AsyncClient(
            timeout=STREAM_TIMEOUT,
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=0),
            **common,
        )

    async def aclose(self) -> None:
        await self._calls.aclose()
        await self._stream.aclose()

    # --- plumbing ------------------------------------------------------------------------------
    def _params(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.params)
        params.update(extra or {})
        return params

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        code: str | None = None,
    ) -> httpx.Response:
        try:
            response = await self._calls.request(
                method, path, params=self._params(params), json=body
            )
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"Nomad at {self.base_url} is unreachable: {exc!r}", code="runner_unavailable"
            ) from None
        if response.status_code >= 400:
            text = response.text.strip() or response.reason_phrase
            raise NomadError(
                f"Nomad {method} {path} answered {response.status_code}: {text}",
                status=response.status_code,
                code=code,
            )
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._request(method, path, **kwargs)).json()

    # --- jobs ----------------------------------------------------------------------------------
    async def register_job(self, job: JSON) -> JSON:
        result: JSON = await self._json("PUT", "/v1/jobs", body={"Job": job})
        return result

    async def get_job(self, job_id: str) -> JSON | None:
        try:
            result: JSON = await self._json("GET", f"/v1/job/{job_id}")
        except NomadError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def plan_job(self, job: JSON) -> JSON:
        """A dry run of registering ``job``: ``Diff.Type`` says whether anything changes."""
        result: JSON = await self._json(
            "PUT", f"/v1/job/{job['ID']}/plan", body={"Job": job, "Diff": True}
        )
        return result

    async def list_jobs(self, prefix: str) -> list[JSON]:
        result: list[JSON] = await self._json(
            "GET", "/v1/jobs", params={"prefix": prefix, "meta": "true"}
        )
        return result

    async def dispatch(self, job_id: str, meta: Mapping[str, str], idempotency_token: str) -> JSON:
        """Dispatch a parameterized job; Nomad reads the token from the query string."""
        result: JSON = await self._json(
            "POST",
            f"/v1/job/{job_id}/dispatch",
            params={"idempotency_token": idempotency_token},
            body={"Meta": dict(meta), "Payload": None},
            code="nomad_dispatch_failed",
        )
        return result

    async def stop_job(self, job_id: str, *, purge: bool = False) -> None:
        """Stop (deregister) a job, or with ``purge`` also remove it from Nomad's state;
        one that is already gone counts as stopped."""
        try:
            await self._request(
                "DELETE", f"/v1/job/{job_id}", params={"purge": "true"} if purge else None
            )
        except NomadError as exc:
            if exc.status != 404:
                raise

    async def job_allocations(self, job_id: str) -> list[JSON]:
        result: list[JSON] = await self._json("GET", f"/v1/job/{job_id}/allocations")
        return result

    async def job_evaluations(self, job_id: str) -> list[JSON]:
        result: list[JSON] = await self._json("GET", f"/v1/job/{job_id}/evaluations")
        return result

    async def allocation(self, alloc_id: str) -> JSON:
        result: JSON = await self._json("GET", f"/v1/allocation/{alloc_id}")
        return result

    async def current_index(self, prefix: str) -> int:
        """Nomad's current raft index (``X-Nomad-Index`` of a cheap list call)."""
        response = await self._request("GET", "/v1/jobs", params={"prefix": prefix})
        return int(response.headers.get("X-Nomad-Index") or 0)

    async def leader(self) -> str:
        result: str = await self._json("GET", "/v1/status/leader")
        return result

    # --- logs ----------------------------------------------------------------------------------
    async def read_log(self, alloc_id: str, task: str, kind: str, limit: int) -> tuple[bytes, bool]:
        """Up to ``limit`` bytes of a task's stdout/stderr from the start, and whether more
        exists. Empty while the task has not started (Nomad answers 404 then)."""
        params = self._params({"task": task, "type": kind, "plain": "true", "origin": "start"})
        chunks: list[bytes] = []
        size = 0
        try:
            async with self._calls.stream(
                "GET", f"/v1/client/fs/logs/{alloc_id}", params=params
            ) as response:
                if response.status_code == 404:
                    return b"", False
                if response.status_code >= 400:
                    text = (await response.aread()).decode("utf-8", "replace").strip()
                    raise NomadError(
                        f"Nomad logs of {alloc_id}/{task} answered {response.status_code}: {text}",
                        status=response.status_code,
                    )
                async for chunk in response.aiter_bytes():
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        break
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"Nomad at {self.base_url} is unreachable: {exc!r}", code="runner_unavailable"
            ) from None
        data = b"".join(chunks)
        return data[:limit], len(data) > limit

    # --- files of an allocation ----------------------------------------------------------------
    async def list_files(self, alloc_id: str, path: str) -> dict[str, int] | None:
        """The files in a directory of an allocation, with their sizes (the client
        filesystem API); ``None`` while the directory does not exist (Nomad 1.6.5: 404)."""
        params = self._params({"path": path})
        try:
            response = await self._calls.get(f"/v1/client/fs/ls/{alloc_id}", params=params)
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"Nomad at {self.base_url} is unreachable: {exc!r}", code="runner_unavailable"
            ) from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise NomadError(
                f"Nomad listing of {alloc_id}:{path} answered {response.status_code}: "
                f"{response.text.strip()}",
                status=response.status_code,
            )
        entries = response.json() or []
        return {str(e["Name"]): int(e.get("Size") or 0) for e in entries if not e.get("IsDir")}

    async def read_file(self, alloc_id: str, path: str, length: int, *, offset: int = 0) -> bytes:
        """``length`` bytes from ``offset`` of a file of an allocation, which a listing
        showed to be at least that long. Nomad 1.6.5 answers a read that fails (file gone,
        unknown allocation) with 200 and the error as the body: a body of another length
        is that error, raised."""
        params = self._params({"path": path, "offset": offset, "limit": length})
        try:
            response = await self._calls.get(f"/v1/client/fs/readat/{alloc_id}", params=params)
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"Nomad at {self.base_url} is unreachable: {exc!r}", code="runner_unavailable"
            ) from None
        if response.status_code != 200 or len(response.content) != length:
            raise NomadError(
                f"Nomad read of {alloc_id}:{path} answered {response.status_code}: "
                f"{response.text.strip()[:300]}",
                status=response.status_code,
            )
        return response.content

    # --- events --------------------------------------------------------------------------------
    async def events(self, topics: list[str], index: int) -> AsyncIterator[JSON]:
        """Event batches ``{"Index", "Events"}`` after ``index``; heartbeats are skipped.

        The first item is ``{}``, as soon as Nomad accepted the subscription (events from
        then on are queued on the connection). Ends when the server closes the stream;
        raises ``BackendUnavailable`` if it cannot connect, ``NomadError`` if Nomad refuses.
        """
        params = self._params({"index": index})
        query = httpx.QueryParams(params).merge({}).add("topic", topics[0]) if topics else None
        for topic in topics[1:]:
            assert query is not None
            query = query.add("topic", topic)
        try:
            async with self._stream.stream("GET", "/v1/event/stream", params=query) as response:
                if response.status_code >= 400:
                    text = (await response.aread()).decode("utf-8", "replace").strip()
                    raise NomadError(
                        f"Nomad event stream answered {response.status_code}: {text}",
                        status=response.status_code,
                    )
                yield {}
                async for line in response.aiter_lines():
                    line = line.strip()
                    if not line:
                        continue
                    batch = json.loads(line)
                    if batch.get("Events"):
                        yield batch
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"Nomad event stream at {self.base_url} broke: {exc!r}", code="runner_unavailable"
            ) from None
