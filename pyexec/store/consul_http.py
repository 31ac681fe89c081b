"""py-consul driven over httpx: the HTTP seam under ``ConsulStore``.

py-consul keeps its HTTP layer pluggable (``consul.base.HTTPClient``); its own
adapters are ``requests`` (blocking) and ``aiohttp`` (``consul.aio``). We plug in
``httpx.AsyncClient`` instead, deliberately:

- every call is a coroutine, so a waiter parked in a Consul blocking query costs
  one socket, not one of anyio's 40 worker threads;
- httpx is already a dependency (the client library), aiohttp would be a second
  HTTP stack, and ``consul.aio`` passes aiohttp arguments that now warn;
- TLS is one ``ssl.SSLContext`` built here, verification always on;
- tests and the benchmark can pass an httpx transport (to count or break requests)
  instead of patching internals.

Transport failures and Consul 5xx become ``BackendUnavailable(code="store_unavailable")``;
other refusals become ``BackendError(code="store_error")``. httpx drops broken
connections from its pool, so the client heals by itself once Consul is back.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import consul.base
import consul.exceptions
import httpx

from pyexec.errors import BackendError, BackendUnavailable, PyexecError
from pyexec.settings import Settings, SettingsError

__all__ = ["AsyncConsul", "ConsulEndpoint", "HttpxConsulClient", "tls_context"]

#: Seconds to connect, and to wait for any answer that is not a blocking query.
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0
#: Consul holds a blocking query without ``wait`` for five minutes.
DEFAULT_WAIT = 300.0

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


@attrs.frozen
class ConsulEndpoint:
    scheme: str
    host: str
    port: int

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @classmethod
    def parse(cls, addr: str, *, tls_configured: bool = False) -> ConsulEndpoint:
        """``host:port``, ``host`` or a ``http(s)://`` URL, as ``CONSUL_HTTP_ADDR`` takes it.

        Without a scheme, configured TLS material means https; an explicit ``http://``
        with TLS material is refused rather than silently sending the token in clear.
        """
        raw = addr.strip()
        explicit = "://" in raw
        url = urllib.parse.urlsplit(raw if explicit else f"//{raw}")
        scheme = url.scheme.lower() if explicit else ("https" if tls_configured else "http")
        try:
            port = url.port
        except ValueError:
            raise SettingsError(f"consul_addr {addr!r} has an invalid port") from None
        if scheme not in {"http", "https"} or not url.hostname or url.path.strip("/"):
            raise SettingsError(
                f"consul_addr {addr!r} must look like host:port or http(s)://host:port",
                name="consul_addr",
            )
        if scheme == "http" and tls_configured:
            raise SettingsError(
                f"consul_addr {addr!r} is plain http but Consul TLS files are configured; "
                "use https:// (TLS is never turned off silently)",
                name="consul_addr",
            )
        if port is None:
            port = (443 if scheme == "https" else 80) if explicit else 8500
        return cls(scheme, url.hostname, port)


def tls_context(
    cacert: str | None, client_cert: str | None, client_key: str | None
) -> ssl.SSLContext:
    """Verifying TLS context: the CA bundle given (else the system's), plus a client cert."""
    try:
        ctx = ssl.create_default_context(cafile=cacert)
        if client_cert:
            ctx.load_cert_chain(client_cert, client_key)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"cannot load Consul TLS files: {exc}", name="consul_cacert") from None
    if client_key and not client_cert:
        raise SettingsError("consul_client_key is set without consul_client_cert")
    return ctx


def _seconds(duration: str) -> float:
    total, number = 0.0, ""
    rest = duration
    while rest:
        if rest[0].isdigit() or rest[0] == ".":
            number += rest[0]
            rest = rest[1:]
            continue
        for unit in sorted(_UNITS, key=len, reverse=True):
            if rest.startswith(unit):
                total += float(number or 0) * _UNITS[unit]
                number, rest = "", rest[len(unit) :]
                break
        else:
            return DEFAULT_WAIT
    return total


def consul_error(exc: consul.exceptions.ConsulException) -> PyexecError:
    """One of ours for what py-consul's response callbacks raised."""
    if isinstance(exc, consul.exceptions.ACLPermissionDenied | consul.exceptions.ACLDisabled):
        return BackendError(f"Consul refused the request (ACL): {exc}", code="store_error")
    if isinstance(
        exc,
        consul.exceptions.BadRequest | consul.exceptions.ClientError | consul.exceptions.NotFound,
    ):
        return BackendError(f"Consul rejected a request: {exc}", code="store_error")
    return BackendUnavailable(f"Consul failed: {exc}", code="store_unavailable")


Callback = Callable[[consul.base.Response], Any]
Params = Sequence[tuple[str, Any]] | None


class HttpxConsulClient(consul.base.HTTPClient):  # type: ignore[misc]
    """py-consul's HTTP client interface, implemented with ``httpx.AsyncClient``."""

    def __init__(
        self,
        endpoint: ConsulEndpoint,
        *,
        verify: ssl.SSLContext | bool,
        token: str | None,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(endpoint.host, endpoint.port, endpoint.scheme, verify=True)
        self.base_uri = endpoint.base_url
        headers = {"X-Consul-Token": token} if token else {}
        self.client = httpx.AsyncClient(
            base_url=endpoint.base_url,
            verify=verify,
            headers=headers,
            transport=transport,
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT, pool=None),
        )

    async def request(
        self,
        callback: Callback,
        method: str,
        path: str,
        params: Params = None,
        headers: Mapping[str, str] | None = None,
        data: str | bytes | None = None,
        raw: bool = False,
    ) -> Any:
        timeout: httpx.Timeout | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
        query = dict(params or ())
        if "index" in query:
            # A blocking query answers only after its wait (plus up to wait/16 of jitter).
            wait = _seconds(str(query["wait"])) if "wait" in query else DEFAULT_WAIT
            timeout = httpx.Timeout(REQUEST_TIMEOUT + wait * 17 / 16, connect=CONNECT_TIMEOUT)
        try:
            response = await self.client.request(
                method,
                path,
                params=list(params or ()),
                headers=headers,
                content=data,
                timeout=timeout,
            )
        except (httpx.TransportError, OSError) as exc:
            # OSError: httpcore lets some socket and TLS errors through unwrapped (a client
            # certificate the server rejects surfaces as ssl.SSLError on the first read).
            raise BackendUnavailable(
                f"Consul at {self.base_uri} is unreachable: {exc!r}", code="store_unavailable"
            ) from exc
        body = response.content if raw else response.text
        try:
            return callback(consul.base.Response(response.status_code, response.headers, body))
        except consul.exceptions.ConsulException as exc:
            raise consul_error(exc) from exc

    async def get(
        self,
        callback: Callback,
        path: str,
        params: Params = None,
        headers: Mapping[str, str] | None = None,
        raw: bool = False,
        **_: Any,
    ) -> Any:
        return await self.request(callback, "GET", path, params, headers, raw=raw)

    async def put(
        self,
        callback: Callback,
        path: str,
        params: Params = None,
        data: str | bytes = "",
        headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> Any:
        return await self.request(callback, "PUT", path, params, headers, data)

    async def delete(
        self,
        callback: Callback,
        path: str,
        params: Params = None,
        data: str | bytes = "",
        headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> Any:
        return await self.request(callback, "DELETE", path, params, headers, data or None)

    async def post(
        self,
        callback: Callback,
        path: str,
        params: Params = None,
        data: str = "",
        headers: Mapping[str, str] | None = None,
        **_: Any,
    ) -> Any:
        return await self.request(callback, "POST", path, params, headers, data)

    async def close(self) -> None:
        await self.client.aclose()


class AsyncConsul(consul.base.Consul):  # type: ignore[misc]
    """A py-consul client whose calls are coroutines over ``HttpxConsulClient``.

    Configuration comes only from the arguments: host, port, scheme and verify are
    always passed, so py-consul never consults ``CONSUL_HTTP_*`` for them, and the
    token is set after construction because py-consul lets ``CONSUL_HTTP_TOKEN``
    override ``token=``.
    """

    def __init__(
        self,
        endpoint: ConsulEndpoint,
        *,
        token: str | None,
        verify: ssl.SSLContext | bool,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http_args: dict[str, Any] = {
            "verify": verify,
            "token": token,
            "max_connections": max_connections,
            "transport": transport,
        }
        self._endpoint = endpoint
        super().__init__(
            host=endpoint.host, port=endpoint.port, scheme=endpoint.scheme, verify=True, token=token
        )
        self.token = token
        self.http: HttpxConsulClient

    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool | str = True, cert: Any = None
    ) -> HttpxConsulClient:
        return HttpxConsulClient(self._endpoint, **self._http_args)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> AsyncConsul:
        if not settings.consul_addr:
            raise SettingsError("consul_addr is not set", name="consul_addr")
        tls_files = (
            settings.consul_cacert,
            settings.consul_client_cert,
            settings.consul_client_key,
        )
        endpoint = ConsulEndpoint.parse(settings.consul_addr, tls_configured=any(tls_files))
        verify: ssl.SSLContext | bool = True
        if endpoint.scheme == "https":
            verify = tls_context(*tls_files)
        return cls(
            endpoint,
            token=settings.consul_token,
            verify=verify,
            max_connections=max_connections,
            transport=transport,
        )
