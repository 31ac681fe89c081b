"""Schemathesis against /openapi.json, every check on: the served API matches its document.

The server is the real app (routing, middleware, protocol, auth with a token) on a loopback
port, over a runner that finishes every run at once. Schemathesis runs all its phases
(examples, coverage, fuzzing, stateful) with a bounded number of examples per operation
(``PYEXEC_SCHEMATHESIS_EXAMPLES``, default 20) and a fixed seed
(``PYEXEC_SCHEMATHESIS_SEED``), so a CI run takes well under a minute and a failure replays.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs

from pyexec.api.openapi import openapi_document
from pyexec.models import Execution, ExecutionRequest
from pyexec.runner import OnOutput, OnRunning
from pyexec.store.memory import MemoryStore

from .conftest import live_server, make_settings
from .fakes import FakeRunner

TOKEN = "schemathesis-token"

#: Every check stays on. One is given more statuses for the upload and eval operations:
#: ``positive_data_acceptance`` expects a schema-valid request to succeed, but no schema
#: can say what makes a tar valid (or which files it must hold for the entrypoint), which
#: python versions and callback hosts a server allows, or that ``code`` and ``files``
#: exclude each other; those requests are refused with 400 and a documented code (413,
#: 429 for the size and in-flight limits). The other operations keep the default list.
CONFIG = """\
[[operations]]
include-path-regex = "^/api/v1/(exec/|eval)"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "413", "429"]
"""


class InstantRunner(FakeRunner):
    """Finishes every run at once: the fake's ``hold`` (stdin) would keep a sync call waiting."""

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        *,
        on_output: OnOutput | None = None,
    ) -> None:
        unheld = attrs.evolve(request, stdin=request.stdin.replace("hold", ""))
        await super().start(execution, unheld, tar, on_running, on_output=on_output)


def test_the_api_passes_every_schemathesis_check(tmp_path: Path) -> None:
    """All phases, all checks, against the served document: no failure."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG, encoding="utf-8")
    settings = make_settings(api_tokens=(TOKEN,))
    with live_server(settings, store=MemoryStore(), runner=InstantRunner()) as server:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(config),
                "run",
                f"{server.url}/openapi.json",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--checks",
                "all",
                "--max-examples",
                os.environ.get("PYEXEC_SCHEMATHESIS_EXAMPLES", "20"),
                "--seed",
                os.environ.get("PYEXEC_SCHEMATHESIS_SEED", "1"),
                "--workers",
                "1",
                "--generation-database",
                "none",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
    operations = sum(len(ops) for ops in openapi_document()["paths"].values())
    assert f"{operations} selected / {operations} total" in done.stdout
