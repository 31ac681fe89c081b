"""The one exception tree of the pyexec client::

    ClientError
    ├── ConnectionFailed        the server could not be reached (refused, DNS, TLS, reset)
    ├── Timeout                 an HTTP request ran past its deadline
    │   └── WaitTimeout         ``wait`` gave up before the execution finished (it still runs)
    ├── APIError                the server answered with an error; carries its ``code``
    │   ├── BadRequestError     400 / 413 / 422: the request was rejected
    │   ├── AuthenticationError 401 / 403: missing or wrong token
    │   ├── NotFoundError       404: no such execution
    │   ├── ConflictError       409
    │   └── ServerError         5xx (``502``/``503`` on reads are retried first)
    ├── ArchiveError            a tar helper refused its input (a path escaping the archive, ...)
    └── InvalidServerURL        the base URL is not an http(s) URL (``localhost:8080``, ...)

Every error has a one-line ``str()`` that the CLI prints as is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Execution

__all__ = [
    "APIError",
    "ArchiveError",
    "AuthenticationError",
    "BadRequestError",
    "ClientError",
    "ConflictError",
    "ConnectionFailed",
    "InvalidServerURL",
    "NotFoundError",
    "ServerError",
    "Timeout",
    "WaitTimeout",
]


class ClientError(Exception):
    """Root of every error the pyexec client raises."""


class ConnectionFailed(ClientError):
    """The server could not be reached."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class Timeout(ClientError):
    """An HTTP request ran past its deadline."""


class WaitTimeout(Timeout):
    """``wait`` reached its deadline; the execution goes on and can be waited for again."""

    def __init__(self, message: str, *, execution: Execution) -> None:
        super().__init__(message)
        self.execution = execution


class APIError(ClientError):
    """The server answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.message} ({self.status_code} {self.code})"


class BadRequestError(APIError):
    """The server rejected the request (400, 413, 422)."""


class AuthenticationError(APIError):
    """The server wants a (different) token (401, 403)."""


class NotFoundError(APIError):
    """No such execution (404)."""


class ConflictError(APIError):
    """The request conflicts with the execution's state (409)."""


class ServerError(APIError):
    """The server or one of its backends failed (5xx)."""


class ArchiveError(ClientError, ValueError):
    """A tar helper refused its input."""


class InvalidServerURL(ClientError, ValueError):
    """The client was given a base URL that is not ``http(s)://host[:port][/prefix]``."""


def api_error_class(status_code: int) -> type[APIError]:
    if status_code in (401, 403):
        return AuthenticationError
    if status_code == 404:
        return NotFoundError
    if status_code == 409:
        return ConflictError
    if status_code >= 500:
        return ServerError
    return BadRequestError
