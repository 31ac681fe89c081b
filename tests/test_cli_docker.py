"""The ``pyexec`` CLI against a real server on the embedded default (local Docker).

In-process for most commands; a few through the installed console script, and
``pyexec serve`` as a real process.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from pyexec.cli import exitcodes, run_cli
from pyexec.client import Client, ConnectionFailed

from .conftest import TEST_IMAGE, LiveServer, free_port, live_server, make_settings

pytestmark = pytest.mark.docker

PYEXEC = str(Path(sys.executable).with_name("pyexec"))


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(make_settings()) as live:
        yield live


@attrs.frozen
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(
    server: LiveServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """Run ``pyexec --server <live> ARGV`` in-process with the given stdin."""

    def invoke(*argv: str, stdin: bytes = b"") -> Result:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        code = run_cli(["--server", server.url, *argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def script(tmp_path: Path, body: str, name: str = "main.py") -> str:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return str(path)


def test_output_streams_and_exit_code(cli: Any, tmp_path: Path) -> None:
    """stdout and stderr stay apart and the script's exit code passes through."""
    path = script(
        tmp_path,
        "import sys\nprint('out')\nprint('err', file=sys.stderr)\nraise SystemExit(3)\n",
    )
    result = cli("run", path)
    assert (result.code, result.out, result.err) == (3, "out\n", "err\n")


def test_directory_project(cli: Any, tmp_path: Path) -> None:
    """A directory with a package runs with its imports working."""
    script(tmp_path, "from pkg.util import X\nprint(X)\n", "proj/main.py")
    script(tmp_path, "X = 42\n", "proj/pkg/util.py")
    script(tmp_path, "", "proj/pkg/__init__.py")
    assert cli("run", str(tmp_path / "proj")).out == "42\n"


def test_files_tar_and_stdin(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--file, a .tar argument and a script on stdin all run."""
    script(tmp_path, "import helper\nhelper.hi()\n", "app.py")
    script(tmp_path, "def hi():\n    print('hi from helper')\n", "helper.py")
    monkeypatch.chdir(tmp_path)
    files = cli("run", "--file", "app.py", "--file", "helper.py", "--entrypoint", "app.py")
    assert files.out == "hi from helper\n"

    tar_path = tmp_path / "bundle.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(tmp_path / "app.py", "main.py")
        tar.add(tmp_path / "helper.py", "helper.py")
    assert cli("run", str(tar_path)).out == "hi from helper\n"
    assert cli("run", stdin=b"print(6 * 7)\n").out == "42\n"


def test_env_and_args(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--env in both forms and the arguments after -- reach the script."""
    monkeypatch.setenv("PYEXEC_TEST_LOCAL", "from the caller")
    path = script(
        tmp_path,
        "import os, sys\nprint(os.environ['A'], os.environ['PYEXEC_TEST_LOCAL'], sys.argv[1:])\n",
    )
    result = cli("run", path, "--env", "A=1", "--env", "PYEXEC_TEST_LOCAL", "--", "-q", "x y")
    assert result.out == "1 from the caller ['-q', 'x y']\n"


def test_json_record(cli: Any, tmp_path: Path) -> None:
    """--json prints one event per line, the output as it came and last the record,
    with the script's output inside."""
    result = cli("--json", "run", script(tmp_path, "print('in json')\n"))
    events = [json.loads(line) for line in result.out.splitlines()]
    assert "".join(e["text"] for e in events if e["event"] == "stdout") == "in json\n"
    record = events[-1]["execution"]
    assert (record["status"], record["reason"], record["exit_code"]) == ("completed", "exited", 0)
    assert record["stdout"] == "in json\n"


def test_timeout_exit_code(cli: Any, tmp_path: Path) -> None:
    """A run over its time limit ends with exit code 124 and a note on stderr."""
    result = cli("run", script(tmp_path, "import time\ntime.sleep(60)\n"), "--timeout", "1")
    assert result.code == exitcodes.TIMEOUT
    assert "timed out" in result.err


def test_submit_follow_tail_and_kill(cli: Any, tmp_path: Path) -> None:
    """submit, follow --tail to the end, then kill a sleeper: exit codes 0/… and 130."""
    quick = cli("submit", script(tmp_path, "print('done')\n"))
    execution_id = quick.out.strip()
    followed = cli("follow", execution_id, "--tail")
    assert (followed.code, followed.out) == (0, "done\n")
    assert cli("-q", "logs", execution_id).out == "done\n"

    sleeper = cli("submit", script(tmp_path, "import time\ntime.sleep(60)\n", "s.py")).out.strip()
    assert cli("kill", sleeper).code == 0
    assert cli("follow", sleeper).code == exitcodes.KILLED


def test_eval(cli: Any) -> None:
    """eval prints output and the last value (not with --no-result); an exception exits non-zero."""
    result = cli("eval", "-c", "print('side')\n6 * 7", "--last-expr")
    assert (result.code, result.out) == (0, "side\n42\n")
    assert cli("eval", "x = 5\\nx * 2").out == "10\n"
    assert cli("eval", "x = 5\\nx * 2", "--no-result").out == ""
    failing = cli("eval", "-c", "raise ValueError('bad')")
    assert failing.code != 0
    assert "ValueError" in failing.err


def test_console_script(server: LiveServer) -> None:
    """The installed `pyexec` entry point runs a piped script and passes its exit code."""
    done = subprocess.run(
        [PYEXEC, "--server", server.url, "run", "-q"],
        input=b"import sys\nprint('via entry point')\nsys.exit(7)\n",
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (7, b"via entry point\n", b"")


def test_console_script_server_down() -> None:
    """The entry point reports an unreachable server in one line with exit 125."""
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        [PYEXEC, "--server", url, "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == exitcodes.PYEXEC_ERROR
    assert done.stderr.count("\n") == 1
    assert "connection refused" in done.stderr


def test_serve(tmp_path: Path) -> None:
    """`pyexec serve --host --port` reads settings from the environment and answers."""
    port = free_port()
    env = {**os.environ, "PYEXEC_DEFAULT_IMAGE": TEST_IMAGE, "PYEXEC_LOG_FORMAT": "text"}
    env.pop("CONSUL_HTTP_ADDR", None)
    env.pop("NOMAD_ADDR", None)
    proc = subprocess.Popen(
        [PYEXEC, "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # bounded readiness poll; a server process offers nothing to wait on
            try:
                with Client(url) as client:
                    assert client.version().backend == "embedded"
                    result = client.run({"main.py": "print('served')"})
                break
            except ConnectionFailed:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        assert result.stdout == "served\n"
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_follow_reports_running_then_done(cli: Any, tmp_path: Path) -> None:
    """follow notes the run starting and finishing, then prints its output."""
    path = script(tmp_path, "import time\ntime.sleep(2)\nprint('slept')\n")
    execution_id = cli("submit", path).out.strip()
    result = cli("follow", execution_id)
    assert (result.code, result.out) == (0, "slept\n")
    assert f"pyexec: {execution_id} running" in result.err
    assert result.err.rstrip().endswith(f"pyexec: {execution_id} completed")


def test_eval_file_stdin_and_exit_code(cli: Any, tmp_path: Path) -> None:
    """eval takes a FILE or stdin, honours --python, and passes SystemExit codes through."""
    path = script(tmp_path, "import sys\nprint(sys.version_info[:2])\n", "v.py")
    assert cli("eval", path, "--python", "3.11").out == "(3, 11)\n"
    assert cli("eval", stdin=b"print('from stdin')\n").out == "from stdin\n"
    assert cli("eval", "-c", "raise SystemExit(3)").code == 3
    both = cli("eval", path, "-c", "1")
    assert both.code == exitcodes.USAGE
    assert "not both" in both.err


def test_serve_with_bad_configuration_says_so_in_one_line(tmp_path: Path) -> None:
    """`pyexec serve` with a configuration it cannot use prints one line and exits 2."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PYEXEC_", "NOMAD_", "CONSUL_"))
    }
    env["PYEXEC_API_TOKEN_FILE"] = str(tmp_path / "missing-tokens")
    done = subprocess.run(
        [PYEXEC, "serve", "--host", "127.0.0.1", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "PYEXEC_API_TOKEN_FILE" in done.stderr
    assert "Traceback" not in done.stderr
