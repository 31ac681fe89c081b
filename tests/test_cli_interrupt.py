"""Interrupting ``pyexec run`` in a real process stops the execution on the server too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest

from pyexec.cli import exitcodes
from pyexec.client import Client, Status
from pyexec.models import Execution, ExecutionRequest
from pyexec.runner import OnOutput, OnRunning
from pyexec.store.memory import MemoryStore

from .conftest import LiveServer, live_server, make_settings
from .fakes import FakeRunner


class HoldingRunner(FakeRunner):
    """Every run goes on until it is killed."""

    async def start(
        self,
        execution: Execution,
        request: ExecutionRequest,
        tar: AsyncIterator[bytes],
        on_running: OnRunning,
        *,
        on_output: OnOutput | None = None,
    ) -> None:
        held = attrs.evolve(request, stdin="hold")
        await super().start(execution, held, tar, on_running, on_output=on_output)


@pytest.fixture(scope="module")
def holding() -> Iterator[LiveServer]:
    with live_server(make_settings(), store=MemoryStore(), runner=HoldingRunner()) as server:
        yield server


def _pyexec(server: LiveServer, *argv: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYEXEC_")}
    return subprocess.Popen(
        [sys.executable, "-m", "pyexec.cli", "--server", server.url, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_kills_the_execution(
    holding: LiveServer, tmp_path: Path, signum: signal.Signals
) -> None:
    """Ctrl-C or SIGTERM during run kills the execution on the server, then exits 130."""
    script = tmp_path / "main.py"
    script.write_text("import time\ntime.sleep(600)\n")
    proc = _pyexec(holding, "-v", "run", str(script))
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # printed once the server knows the execution
        assert line.startswith("pyexec: exe_"), line
        execution_id = line.split()[1]
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == exitcodes.KILLED
    assert f"killed {execution_id}" in err
    assert "Traceback" not in err
    with Client(holding.url) as client:
        assert client.get(execution_id).status is Status.KILLED


def test_interrupted_follow_leaves_the_execution_running(holding: LiveServer) -> None:
    """Ctrl-C during follow stops watching only; the execution goes on and pyexec says so."""
    with Client(holding.url) as client:
        execution_id = client.submit({"main.py": "print(1)"}).execution_id
        proc = _pyexec(holding, "follow", execution_id)
        try:
            assert proc.stderr is not None
            assert proc.stderr.readline().startswith(f"pyexec: {execution_id} running")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == exitcodes.KILLED
        assert f"{execution_id} goes on" in err
        assert client.get(execution_id).status is Status.RUNNING
        client.kill(execution_id)


def test_sigterm_handler_is_restored() -> None:
    """SIGTERM interrupts only inside the block; the previous handler comes back after."""
    from pyexec.cli.interrupts import Interrupted, sigterm_interrupts

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="terminated"), sigterm_interrupts():
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


def test_interrupted_eval_kills_the_execution(holding: LiveServer) -> None:
    """Ctrl-C during eval kills the evaluation on the server too, then exits 130."""
    proc = _pyexec(holding, "-v", "eval", "-c", "import time\ntime.sleep(600)")
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("pyexec: exe_"), line
        execution_id = line.split()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == exitcodes.KILLED
    assert f"killed {execution_id}" in err
    with Client(holding.url) as client:
        assert client.get(execution_id).status is Status.KILLED
