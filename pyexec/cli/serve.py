"""``pyexec serve``: settings are read from the environment here, at the edge."""

from __future__ import annotations

import os
import sys
from typing import Annotated

from cyclopts import Parameter

__all__ = ["serve"]

#: Distributions of the ``server`` extra; missing one means the extra is not installed.
SERVER_MODULES = frozenset(
    {
        "starlette",
        "uvicorn",
        "docker",
        "anyio",
        "consul",
        "multipart",
        "python_multipart",
        "prometheus_client",
        "swagger_ui_bundle",
        "swagger_ui",
    }
)


def serve(
    *,
    host: Annotated[str | None, Parameter(help="Address to bind (default: PYEXEC_HOST).")] = None,
    port: Annotated[int | None, Parameter(help="Port to listen on (default: PYEXEC_PORT).")] = None,
    allow_unauthenticated: Annotated[
        bool,
        Parameter(
            help="Serve on a non-loopback address without API tokens: anyone who reaches the "
            "port can run code (default: PYEXEC_ALLOW_UNAUTHENTICATED).",
            negative=(),
        ),
    ] = False,
) -> int:
    """Start the pyexec service (configured by PYEXEC_* and the Nomad/Consul variables)."""
    from pyexec.errors import PyexecError
    from pyexec.settings import Settings

    try:
        from pyexec.api.server import serve as run_server
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in SERVER_MODULES:
            raise
        sys.stderr.write(
            f"pyexec: the server is not installed ({exc.name} is missing): "
            "pip install 'pyexec[server]'\n"
        )
        return 1
    overrides: dict[str, object] = {
        k: v for k, v in (("host", host), ("port", port)) if v is not None
    }
    if allow_unauthenticated:
        overrides["allow_unauthenticated"] = True
    try:
        settings = Settings.from_env(os.environ, **overrides)
    except PyexecError as exc:
        sys.stderr.write(f"pyexec: {exc.message}\n")
        return 2
    try:
        run_server(settings)
    except PyexecError as exc:  # e.g. an unreadable token file, Nomad without Consul
        sys.stderr.write(f"pyexec: {exc.message}\n")
        return 2
    return 0
