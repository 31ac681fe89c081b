"""The ``pyexec`` CLI in-process against a live server whose runner is scripted.

The fake runner answers with the request it received (as JSON on stdout), so these
tests pin what the CLI sends and how it prints and exits; ``test_cli_docker.py`` runs
real scripts.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from pyexec.cli import exitcodes, run_cli
from pyexec.client import Client, RunOptions
from pyexec.models import ExecutionRequest, Reason, RunOutcome
from pyexec.store.memory import MemoryStore

from .conftest import LiveServer, free_port, live_server, make_settings
from .fakes import FakeRunner


def scripted(request: ExecutionRequest) -> RunOutcome:
    """Echo the request; env REASON/EXIT choose how the run ends."""
    env = dict(request.env_vars)
    reason = Reason(env.get("REASON", "exited"))
    return RunOutcome(
        reason=reason,
        exit_code=int(env.get("EXIT", "0")) if reason is Reason.EXITED else None,
        stdout=json.dumps(request.to_dict()) + "\n",
        stderr="to stderr\n",
        error="boom" if reason is Reason.ERROR else None,
    )


@attrs.frozen
class Fake:
    server: LiveServer
    runner: FakeRunner

    def last_tar(self) -> dict[str, bytes]:
        data = self.runner.tars[self.runner.started[-1]]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def fake() -> Iterator[Fake]:
    runner = FakeRunner(scripted)
    # A permissive server, so every execution flag reaches the (fake) runner.
    settings = make_settings(allow_network=True, setup_network=True, allowed_images=("*",))
    with live_server(settings, store=MemoryStore(), runner=runner) as server:
        yield Fake(server, runner)


@attrs.frozen
class Result:
    code: int
    out: str
    err: str

    def request(self) -> dict[str, Any]:
        """The request the fake runner echoed back."""
        body: dict[str, Any] = json.loads(self.out.splitlines()[0])
        return body


class TtyBytes(io.BytesIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(fake: Fake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``pyexec --server <fake> ARGV`` in-process with the given stdin."""

    def invoke(*argv: str, stdin: bytes = b"", tty: bool = False, server: bool = True) -> Result:
        raw = TtyBytes(stdin) if tty else io.BytesIO(stdin)
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw))
        prefix = ["--server", fake.server.url] if server else []
        code = run_cli([*prefix, *argv])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "proj" / "lib").mkdir(parents=True)
    (tmp_path / "proj" / "main.py").write_text("import lib.util\n")
    (tmp_path / "proj" / "lib" / "util.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "proj"


# --- Input methods ----------------------------------------------------------------------


def test_run_single_file(cli: Any, fake: Fake, tmp_path: Path) -> None:
    """A script argument is uploaded alone and run; its stderr stays on stderr."""
    script = tmp_path / "hello.py"
    script.write_text("print('hi')\n")
    result = cli("run", str(script))
    assert result.code == 0
    assert result.request()["entrypoint"] == "hello.py"
    assert result.err == "to stderr\n"
    assert fake.last_tar() == {"hello.py": b"print('hi')\n"}


def test_run_directory_finds_main(cli: Any, fake: Fake, project: Path) -> None:
    """A directory is uploaded whole and main.py is picked as the entrypoint."""
    result = cli("run", str(project))
    assert result.code == 0
    assert result.request()["entrypoint"] == "main.py"
    assert sorted(fake.last_tar()) == ["lib/util.py", "main.py"]


def test_run_tar_file(cli: Any, fake: Fake, tmp_path: Path) -> None:
    """An explicit .tar is uploaded as is."""
    path = tmp_path / "bundle.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("app/__main__.py")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"x=1"))
    result = cli("run", str(path))
    assert result.code == 0
    assert result.request()["entrypoint"] == "app/__main__.py"
    assert fake.runner.tars[fake.runner.started[-1]] == path.read_bytes()


def test_run_files_keep_relative_paths(cli: Any, fake: Fake, project: Path) -> None:
    """--file PATH (repeatable) keeps each file's relative path."""
    os.chdir(project)
    result = cli("run", "--file", "main.py", "--file", "lib/util.py")
    assert result.code == 0
    assert sorted(fake.last_tar()) == ["lib/util.py", "main.py"]


@pytest.mark.parametrize("argv", [("run", "-"), ("run",)])
def test_run_from_stdin(cli: Any, fake: Fake, argv: tuple[str, ...]) -> None:
    """A script piped on stdin (with - or without any argument) runs as main.py."""
    result = cli(*argv, stdin=b"print('piped')\n")
    assert result.code == 0
    assert fake.last_tar() == {"main.py": b"print('piped')\n"}


def test_run_tar_from_stdin(cli: Any, fake: Fake) -> None:
    """A tar piped on stdin is recognised and uploaded as is."""
    from pyexec.client import tar_from_mapping

    data = tar_from_mapping({"main.py": "print(1)", "x.txt": "x"})
    assert cli("run", stdin=data).code == 0
    assert fake.runner.tars[fake.runner.started[-1]] == data


def test_empty_stdin_is_a_usage_error(cli: Any) -> None:
    """Empty stdin and no other input ends with a clear message and exit code 2."""
    result = cli("run")
    assert result.code == exitcodes.USAGE
    assert "stdin is empty" in result.err


def test_terminal_stdin_is_never_read(cli: Any) -> None:
    """A terminal on stdin with no input is a usage error, not a wait for typing."""
    result = cli("run", tty=True, stdin=b"print(1)\n")
    assert result.code == exitcodes.USAGE
    assert "no program given" in result.err


@pytest.mark.parametrize("command", ["run", "eval"])
def test_closed_stdin_is_a_usage_error(
    fake: Fake, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """With stdin closed (``<&-``, where Python has no sys.stdin) run and eval say so, exit 2."""
    monkeypatch.setattr(sys, "stdin", None)
    assert run_cli(["--server", fake.server.url, command]) == exitcodes.USAGE
    assert "stdin is empty" in capsys.readouterr().err


def test_unreadable_local_files_are_usage_errors(cli: Any, tmp_path: Path) -> None:
    """A missing --requirements file or a FILE that is not UTF-8 is one line, exit 2."""
    (tmp_path / "bin.py").write_bytes(b"\xff\xfe\x00")
    missing = str(tmp_path / "nope.txt")
    for argv in (
        ("eval", "-c", "1", "--requirements", missing),
        ("eval", str(tmp_path / "bin.py")),
        ("run", str(tmp_path / "bin.py"), "--requirements", missing),
    ):
        result = cli(*argv)
        assert result.code == exitcodes.USAGE, argv
        assert result.err.count("\n") == 1, result.err


def test_eval_file_keeps_its_name(cli: Any, fake: Fake, tmp_path: Path) -> None:
    """eval FILE ships the code under the file's own name; -c code is main.py."""
    (tmp_path / "analysis.py").write_text("print(1)\n")
    assert cli("eval", str(tmp_path / "analysis.py")).code == 0
    assert "analysis.py" in fake.last_tar()
    assert cli("eval", "-c", "print(1)").code == 0
    assert "main.py" in fake.last_tar()


def _wrapper_config(fake: Fake) -> str:
    """The ``main({...})`` line eval's wrapper was shipped with."""
    return fake.last_tar()[".pyexec/eval.py"].decode().rstrip().splitlines()[-1]


def test_eval_prints_the_result_by_default(cli: Any, fake: Fake) -> None:
    """eval asks for the last expression's value unless --no-result; --last-expr still works."""
    assert cli("eval", "-c", "1").code == 0
    assert "'eval_last_expr': True" in _wrapper_config(fake)
    assert cli("eval", "-c", "1", "--no-result").code == 0
    assert "'eval_last_expr': False" in _wrapper_config(fake)
    assert cli("eval", "-c", "1", "--last-expr").code == 0
    assert "'eval_last_expr': True" in _wrapper_config(fake)


def test_eval_positional_code(cli: Any, fake: Fake, tmp_path: Path) -> None:
    """A positional argument that names no file is code; typed \\n escapes become newlines."""
    assert cli("eval", "x = 5\\nx * 2").code == 0
    assert fake.last_tar()["main.py"] == b"x = 5\nx * 2"
    # An escape inside a string literal is the code's own, and stays.
    assert cli("eval", 'print("a\\nb")').code == 0
    assert fake.last_tar()["main.py"] == b'print("a\\nb")'
    # A word ending in .py is a FILE, so a missing one is reported, not run as code.
    missing = cli("eval", str(tmp_path / "missing.py"))
    assert missing.code == exitcodes.USAGE
    assert "missing.py" in missing.err


def test_run_async_submits(cli: Any, fake: Fake, tmp_path: Path) -> None:
    """run --async prints the execution id without waiting, like submit."""
    (tmp_path / "main.py").write_text("")
    submitted = cli("run", "--async", str(tmp_path / "main.py"), "--env", "EXIT=5")
    assert submitted.code == 0
    execution_id = submitted.out.strip()
    assert execution_id.startswith("exe_")
    assert cli("follow", execution_id).code == 5


def test_local_archive_problems_are_usage_errors(
    cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --file outside the directory, a .tar that is not one, a compressed tar: exit 2."""
    (tmp_path / "outside.py").write_text("print(1)\n")
    (tmp_path / "inner").mkdir()
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    monkeypatch.chdir(tmp_path / "inner")
    (tmp_path / "project.tar.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    for argv in (
        ("run", "--file", "../outside.py"),
        ("run", str(tmp_path / "bad.tar")),
        ("run", str(tmp_path / "project.tar.gz")),
    ):
        result = cli(*argv)
        assert result.code == exitcodes.USAGE, (argv, result.err)
        assert result.err.count("\n") == 1, result.err


def test_file_and_path_together_are_refused(cli: Any, project: Path) -> None:
    """--file and a PATH argument at once are ambiguous and refused."""
    assert cli("run", "--file", "proj/main.py", "proj").code == exitcodes.USAGE


# --- Entrypoints ------------------------------------------------------------------------


def test_missing_entrypoint_lists_files(cli: Any, project: Path) -> None:
    """An --entrypoint not in the archive fails before upload and lists what is there."""
    result = cli("run", str(project), "--entrypoint", "nope.py")
    assert result.code == exitcodes.USAGE
    assert "nope.py" in result.err
    assert "lib/util.py" in result.err


def test_entrypoint_falls_back_to_first_script(cli: Any, tmp_path: Path) -> None:
    """Without main.py or __main__.py, the first .py file in sorted order runs."""
    (tmp_path / "d").mkdir()
    for name in ("zeta.py", "alpha.py", "notes.txt"):
        (tmp_path / "d" / name).write_text("")
    assert cli("run", str(tmp_path / "d")).request()["entrypoint"] == "alpha.py"


def test_no_script_to_run_is_a_usage_error(cli: Any, tmp_path: Path) -> None:
    """A directory with several files and no Python script asks for --entrypoint."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("")
    (tmp_path / "d" / "b.txt").write_text("")
    result = cli("run", str(tmp_path / "d"))
    assert result.code == exitcodes.USAGE
    assert "--entrypoint" in result.err
    assert "a.txt, b.txt" in result.err


# --- Flags and arguments -------------------------------------------------------------------


def test_execution_flags_reach_the_server(cli: Any, tmp_path: Path) -> None:
    """Every execution flag ends up in the metadata the server receives."""
    (tmp_path / "main.py").write_text("")
    (tmp_path / "req.txt").write_text("attrs\n")
    result = cli(
        "run", str(tmp_path / "main.py"),
        "--timeout", "7", "--memory", "128", "--disk", "16", "--cpu", "512", "--network",
        "--image", "custom:image", "--requirements", str(tmp_path / "req.txt"),
        "--pre-command", "echo one", "--pre-command", "echo two",
    )  # fmt: skip
    request = result.request()
    assert request["config"]["timeout_seconds"] == 7
    assert request["config"]["memory_mb"] == 128
    assert request["config"]["disk_mb"] == 16
    assert request["config"]["cpu_shares"] == 512
    assert request["config"]["network_disabled"] is False
    assert request["docker_image"] == "custom:image"
    assert request["requirements_txt"] == "attrs\n"
    assert request["pre_commands"] == ["echo one", "echo two"]


def test_env_both_forms(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--env KEY=VALUE is sent as is; --env KEY takes the local value."""
    (tmp_path / "main.py").write_text("")
    monkeypatch.setenv("FROM_HERE", "local value")
    result = cli("run", str(tmp_path / "main.py"), "--env", "A=1=2", "--env", "FROM_HERE")
    assert result.request()["env_vars"] == ["A=1=2", "FROM_HERE=local value"]


def test_env_key_missing_locally(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--env KEY with KEY unset locally is a clear usage error."""
    (tmp_path / "main.py").write_text("")
    monkeypatch.delenv("PYEXEC_SURELY_UNSET", raising=False)
    result = cli("run", str(tmp_path / "main.py"), "--env", "PYEXEC_SURELY_UNSET")
    assert result.code == exitcodes.USAGE
    assert "PYEXEC_SURELY_UNSET is not set" in result.err


def test_script_args_after_double_dash(cli: Any, tmp_path: Path) -> None:
    """Everything after -- goes to the script, even what looks like a pyexec option."""
    (tmp_path / "main.py").write_text("")
    result = cli("run", str(tmp_path / "main.py"), "--", "-q", "--json", "plain")
    assert result.request()["script_args"] == ["-q", "--json", "plain"]
    assert result.err == "to stderr\n"


@pytest.mark.parametrize(
    "argv", [("-q", "run", "{}"), ("run", "-q", "{}"), ("run", "{}", "--quiet")]
)
def test_global_options_before_or_after_the_command(
    cli: Any, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    """-q works before the command or after it, and leaves stdout only."""
    (tmp_path / "main.py").write_text("")
    result = cli(*(a.format(tmp_path / "main.py") for a in argv))
    assert result.code == 0
    assert result.err == ""
    assert result.request()["entrypoint"] == "main.py"


def test_server_from_environment(
    fake: Fake, cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PYEXEC_SERVER (with a trailing slash) picks the server when --server is absent."""
    monkeypatch.setenv("PYEXEC_SERVER", fake.server.url + "/")
    (tmp_path / "main.py").write_text("")
    assert cli("run", str(tmp_path / "main.py"), server=False).code == 0


# --- Output and exit codes --------------------------------------------------------------------


def test_json_output_is_the_record(cli: Any, tmp_path: Path) -> None:
    """--json prints one event per line, the last the end with the full record, and
    still exits with the script's code."""
    (tmp_path / "main.py").write_text("")
    result = cli("--json", "run", str(tmp_path / "main.py"), "--env", "EXIT=4")
    events = [json.loads(line) for line in result.out.splitlines()]
    assert events[-1]["event"] == "end"
    record = events[-1]["execution"]
    assert result.code == 4
    assert record["execution_id"].startswith("exe_")
    assert (record["status"], record["exit_code"]) == ("completed", 4)
    assert result.err == ""


def test_verbose_prints_metadata(cli: Any, tmp_path: Path) -> None:
    """-v adds the execution's metadata on stderr, keeping stdout to the script."""
    (tmp_path / "main.py").write_text("")
    result = cli("run", "-v", str(tmp_path / "main.py"))
    assert "pyexec: execution_id: exe_" in result.err
    assert "pyexec: status: completed" in result.err
    assert result.request()["entrypoint"] == "main.py"


@pytest.mark.parametrize(
    ("env", "code"),
    [
        ("EXIT=3", 3),
        ("REASON=timeout", exitcodes.TIMEOUT),
        ("REASON=oom", exitcodes.OOM),
        ("REASON=output_limit", exitcodes.OUTPUT_LIMIT),
        ("REASON=setup_failed", exitcodes.SETUP_FAILED),
        ("REASON=error", exitcodes.PYEXEC_ERROR),
    ],
)
def test_exit_codes(cli: Any, tmp_path: Path, env: str, code: int) -> None:
    """The script's own code passes through; each other ending has its own code."""
    (tmp_path / "main.py").write_text("")
    result = cli("run", str(tmp_path / "main.py"), "--env", env)
    assert result.code == code
    if code != 3:
        assert result.err.splitlines()[-1].startswith("pyexec: exe_")


# --- Other commands -----------------------------------------------------------------------------


def test_submit_follow_logs(cli: Any, tmp_path: Path) -> None:
    """submit prints an id; follow waits and exits like run; logs prints the output."""
    (tmp_path / "main.py").write_text("")
    submitted = cli("submit", str(tmp_path / "main.py"), "--env", "EXIT=5")
    execution_id = submitted.out.strip()
    assert submitted.code == 0
    assert execution_id.startswith("exe_")
    followed = cli("follow", execution_id)
    assert followed.code == 5
    assert f"pyexec: {execution_id} completed" in followed.err
    assert json.loads(followed.out)["entrypoint"] == "main.py"
    tailed = cli("follow", execution_id, "--tail")
    assert tailed.code == 5
    assert tailed.out == followed.out
    logs = cli("logs", execution_id)
    assert (logs.code, logs.out) == (0, followed.out)


def test_kill_running_and_finished(cli: Any, fake: Fake) -> None:
    """kill stops a running execution; killing it again reports it as finished, exit 0."""
    with Client(fake.server.url) as client:
        execution_id = client.submit({"main.py": ""}, RunOptions(stdin="hold")).execution_id
    first = cli("kill", execution_id)
    assert (first.code, first.out) == (0, f"{execution_id} killed\n")
    assert cli("follow", execution_id).code == exitcodes.KILLED
    again = cli("--json", "kill", execution_id)
    assert again.code == 0
    assert json.loads(again.out)["status"] == "killed"


def test_follow_gives_up_at_its_timeout(cli: Any, fake: Fake) -> None:
    """follow --timeout stops waiting with its own exit code; the run goes on."""
    with Client(fake.server.url) as client:
        execution_id = client.submit({"main.py": ""}, RunOptions(stdin="hold")).execution_id
    result = cli("follow", execution_id, "--timeout", "0.5")
    assert result.code == exitcodes.GAVE_UP_WAITING
    assert "still running" in result.err
    cli("kill", execution_id)


def test_version(cli: Any) -> None:
    """version prints the client and the server versions."""
    result = cli("version")
    assert result.code == 0
    assert result.out.splitlines()[0] == "client 0.1.0"
    assert "server 0.1.0 (embedded)" in result.out
    as_json = json.loads(cli("--json", "version").out)
    assert as_json == {"client": "0.1.0", "server": "0.1.0", "backend": "embedded"}


def test_unknown_execution(cli: Any) -> None:
    """logs for an unknown id prints the server's error in one line, exit 125."""
    result = cli("logs", "exe_00000000-0000-4000-8000-000000000000")
    assert result.code == exitcodes.PYEXEC_ERROR
    assert result.err.count("\n") == 1
    assert "execution_not_found" in result.err


# --- Error paths --------------------------------------------------------------------------------


def test_server_down(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """With nothing listening, one clear line and exit 125, no traceback."""
    (tmp_path / "main.py").write_text("")
    url = f"http://127.0.0.1:{free_port()}"
    code = run_cli(["--server", url, "run", str(tmp_path / "main.py")])
    err = capsys.readouterr().err
    assert code == exitcodes.PYEXEC_ERROR
    assert err == f"pyexec: cannot reach the pyexec server at {url}: connection refused\n"


def test_malformed_server_url(capsys: pytest.CaptureFixture[str]) -> None:
    """--server without http:// is a usage error in one line, exit 2."""
    assert run_cli(["--server", "localhost:8080", "version"]) == exitcodes.USAGE
    err = capsys.readouterr().err
    assert err == (
        "pyexec: 'localhost:8080' is not a server URL; expected http://HOST[:PORT] or https://...\n"
    )


def test_bad_token(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A wrong token prints one line pointing at --token, exit 125."""
    (tmp_path / "main.py").write_text("")
    settings = make_settings(api_tokens=("right",))
    with live_server(settings, store=MemoryStore(), runner=FakeRunner(scripted)) as server:
        code = run_cli(
            ["--server", server.url, "--token", "wrong", "run", str(tmp_path / "main.py")]
        )
        ok = run_cli(["--server", server.url, "--token", "right", "version"])
    err = capsys.readouterr().err
    assert code == exitcodes.PYEXEC_ERROR
    assert "unauthorized" in err
    assert "--token" in err
    assert ok == 0


def test_not_a_pyexec_server(capsys: pytest.CaptureFixture[str], fake: Fake) -> None:
    """A URL that answers 404 for the API says it may not be a pyexec server."""
    code = run_cli(["--server", fake.server.url + "/elsewhere", "version"])
    assert code == exitcodes.PYEXEC_ERROR
    assert "a pyexec server?" in capsys.readouterr().err


def test_a_web_server_that_is_not_pyexec(capsys: pytest.CaptureFixture[str]) -> None:
    """A URL serving HTML (or a redirect) is one line asking whether it is a pyexec server."""
    import http.server
    import threading

    class Html(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *args: Any) -> None:
            return None

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Html) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            url = f"http://127.0.0.1:{httpd.server_address[1]}"
            code = run_cli(["--server", url, "version", "--json"])
        finally:
            httpd.shutdown()
            thread.join()
    err = capsys.readouterr().err
    assert code == exitcodes.PYEXEC_ERROR
    assert err.count("\n") == 1
    assert f"is {url} a pyexec server?" in err


@pytest.mark.parametrize("command", ["follow", "logs", "kill"])
@pytest.mark.parametrize("bad", ["a/b", "..", "x?y", ""])
def test_malformed_execution_id_is_a_usage_error(cli: Any, command: str, bad: str) -> None:
    """An id that cannot be one (a slash, a query, empty) is refused locally in one line."""
    result = cli(command, bad)
    assert result.code == exitcodes.USAGE
    assert result.err == f"pyexec: {bad!r} is not an execution id\n"


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown option is a usage error (exit 2), reported by the parser."""
    assert run_cli(["run", "--no-such-option"]) == exitcodes.USAGE


def test_serve_without_server_extra(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve without the server dependencies says how to install them, exit 1."""
    monkeypatch.delitem(sys.modules, "pyexec.api.server", raising=False)
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert run_cli(["serve"]) == 1
    assert "pip install 'pyexec[server]'" in capsys.readouterr().err


# --- Terminal niceties ----------------------------------------------------------------------


class TtyText(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal() -> None:
    """The spinner draws on a terminal, is wiped at the end, and stays off for pipes or -q."""
    import threading

    from pyexec.cli.options import Globals
    from pyexec.cli.render import Progress

    tty = TtyText()
    drawn = threading.Event()
    original_flush = tty.flush

    def flush() -> None:
        original_flush()
        if "running" in tty.getvalue():
            drawn.set()

    tty.flush = flush  # type: ignore[method-assign]
    with Progress(Globals(), "running", stream=tty, interval=0.01):
        assert drawn.wait(10)
    assert tty.getvalue().endswith("\r\x1b[K")

    for stream, options in ((io.StringIO(), Globals()), (TtyText(), Globals(quiet=True))):
        with Progress(options, "running", stream=stream, interval=0.01) as progress:
            assert not progress.enabled
        assert stream.getvalue() == ""


def test_notes_clear_the_spinner_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal a note first wipes the line (a spinner may be on it); piped, it is plain."""
    from pyexec.cli.options import Globals
    from pyexec.cli.render import note

    for stream, expected in ((TtyText(), "\r\x1b[Kpyexec: hi\n"), (io.StringIO(), "pyexec: hi\n")):
        monkeypatch.setattr(sys, "stderr", stream)
        note(Globals(), "hi")
        assert stream.getvalue() == expected


def test_shell_completion_is_available() -> None:
    """cyclopts generates a completion script that knows the commands."""
    from pyexec.cli import app

    script = app.generate_completion(prog_name="pyexec", shell="bash")  # noqa: S604 - a cyclopts option, no shell runs
    assert "pyexec" in script
    assert "follow" in script


def test_help_lists_every_command_with_a_line() -> None:
    """``pyexec --help`` gives every command a help line without importing the lazy ones."""
    code = (
        "import sys\n"
        "from pyexec.cli import run_cli\n"
        "run_cli(['--help'])\n"
        "lazy = ('pyexec.cli.nomad_cmds', 'pyexec.configref')\n"
        "print(sorted(m for m in sys.modules if m in lazy))\n"
    )
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
    ).stdout
    rows = [line.strip("│ ").split(None, 1) for line in out.splitlines() if line.startswith("│ ")]
    helps = {row[0]: row[1].strip(" │") if len(row) > 1 else "" for row in rows}
    commands = ("run", "submit", "follow", "logs", "kill", "version", "eval", "mcp", "serve")
    for command in (*commands, "job", "bundle", "config-reference"):
        assert helps.get(command), command
    assert out.splitlines()[-1] == "[]"


def test_docs_list_every_command() -> None:
    """docs/cli.md's command table names every command the CLI has, and no other."""
    from pyexec.cli import app

    docs = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    table = docs.split("## Commands", 1)[1].split("\n\n", 2)[1]
    documented = {row.split("`")[1].split()[0] for row in table.splitlines()[2:]}
    commands = {name for name in app if not name.startswith("-")}
    assert documented - {"--install-completion"} == commands
