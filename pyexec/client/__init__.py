"""Python client for the pyexec HTTP API.

``Client`` blocks, ``AsyncClient`` awaits; both build requests and parse answers in
one shared place (``_base``) and differ only in I/O::

    from pyexec.client import Client, RunOptions, tar_from_directory

    with Client("http://localhost:8080", token="...") as client, tar_from_directory("proj") as tar:
        result = client.run(tar, RunOptions(timeout=30))
        print(result.stdout, result.exit_code)
"""

from ._async import AsyncClient
from ._base import DEFAULT_SERVER, RetryPolicy, Source
from ._sync import Client
from .archive import (
    archive_names,
    is_tar,
    tar_from_directory,
    tar_from_files,
    tar_from_mapping,
    tar_from_stream,
)
from .errors import (
    APIError,
    ArchiveError,
    AuthenticationError,
    BadRequestError,
    ClientError,
    ConflictError,
    ConnectionFailed,
    InvalidServerURL,
    NotFoundError,
    ServerError,
    Timeout,
    WaitTimeout,
)
from .events import EndEvent, OutputEvent, StatusEvent, StreamEvent
from .models import (
    Artifact,
    Execution,
    Logs,
    Reason,
    RunOptions,
    ServerVersion,
    Status,
    Submitted,
)

__all__ = [
    "DEFAULT_SERVER",
    "APIError",
    "ArchiveError",
    "Artifact",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientError",
    "ConflictError",
    "ConnectionFailed",
    "EndEvent",
    "Execution",
    "InvalidServerURL",
    "Logs",
    "NotFoundError",
    "OutputEvent",
    "Reason",
    "RetryPolicy",
    "RunOptions",
    "ServerError",
    "ServerVersion",
    "Source",
    "Status",
    "StatusEvent",
    "StreamEvent",
    "Submitted",
    "Timeout",
    "WaitTimeout",
    "archive_names",
    "is_tar",
    "tar_from_directory",
    "tar_from_files",
    "tar_from_mapping",
    "tar_from_stream",
]
