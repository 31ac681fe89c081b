"""Consul's HTTP API over httpx: the few calls ``ConsulStore`` makes, nothing else.

py-consul is not used (it was until this version), for the same reasons the Nomad
runner speaks to Nomad with httpx (``pyexec/runner/nomad_http.py``):

- the store needs eight calls (txn, KV get/put/delete, keys, blocking get, leader);
  py-consul's async support meant replacing its HTTP layer, and its response checks
  are private (``consul.callback.CB._status``), so every upgrade could break us;
- py-consul reads ``CONSUL_HTTP_TOKEN``/``CONSUL_HTTP_ADDR`` from the environment and
  lets them override the arguments; configuration here comes from ``Settings`` only;
- every call is a coroutine on ``httpx.AsyncClient``: a waiter parked in a blocking
  query costs one socket, not a worker thread; TLS is one ``ssl.SSLContext`` built
  here, verification always on; tests pass an httpx transport (to count or break
  requests) instead of patching internals.

Transport failures and Consul 5xx become ``BackendUnavailable(code="store_unavailable")``;
other refusals become ``BackendError(code="store_error")``. httpx drops broken
connections from its pool, so the client heals by itself once Consul is back.
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Iterable, Mapping

import attrs
import httpx

from pyexec.errors import BackendError, BackendUnavailable
from pyexec.settings import Settings, SettingsError

__all__ = ["ConsulEndpoint", "ConsulHTTP", "tls_context"]

#: Seconds to connect, and to wait for any answer that is not a blocking query.
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0

Params = Mapping[str, str | int] | None


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


class ConsulHTTP:
    """One ``httpx.AsyncClient`` for Consul, with the token, TLS and error mapping."""

    def __init__(
        self,
        endpoint: ConsulEndpoint,
        *,
        token: str | None,
        verify: ssl.SSLContext | bool,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.verify = verify
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

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> ConsulHTTP:
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

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Params = None,
        content: bytes | str | None = None,
        headers: Mapping[str, str] | None = None,
        wait_seconds: float | None = None,
        ok: Iterable[int] = (),
    ) -> httpx.Response:
        """The answer to one call; statuses in ``ok`` (and 2xx) are returned, any other
        raises. ``wait_seconds``: a blocking query, whose answer may take that long (plus
        Consul's jitter of up to a sixteenth)."""
        timeout: httpx.Timeout | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
        if wait_seconds is not None:
            timeout = httpx.Timeout(
                REQUEST_TIMEOUT + wait_seconds * 17 / 16, connect=CONNECT_TIMEOUT
            )
        try:
            response = await self.client.request(
                method, path, params=params, content=content, headers=headers, timeout=timeout
            )
        except (httpx.TransportError, OSError) as exc:
            # OSError: httpcore lets some socket and TLS errors through unwrapped (a client
            # certificate the server rejects surfaces as ssl.SSLError on the first read).
            raise BackendUnavailable(
                f"Consul at {self.endpoint.base_url} is unreachable: {exc!r}",
                code="store_unavailable",
            ) from exc
        if response.is_success or response.status_code in set(ok):
            return response
        text = response.text.strip()[:500]
        if response.status_code >= 500:
            raise BackendUnavailable(
                f"Consul failed ({response.status_code}): {text}", code="store_unavailable"
            )
        if response.status_code == 403:
            raise BackendError(f"Consul refused the request (ACL): {text}", code="store_error")
        raise BackendError(
            f"Consul rejected {method} {path} ({response.status_code}): {text}",
            code="store_error",
        )

    async def aclose(self) -> None:
        await self.client.aclose()
