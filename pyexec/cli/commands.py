"""The commands that talk to a pyexec server: run, submit, follow, logs, kill, version, eval."""

from __future__ import annotations

import ast
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Annotated

from cyclopts import Parameter

from pyexec.__about__ import __version__
from pyexec.client import Client, Execution, RunOptions, Status
from pyexec.client._base import check_execution_id, run_wait

from . import exitcodes
from .inputs import STDIN, gather, process_stdin
from .interrupts import Interrupted, run_to_end
from .live import LivePrinter
from .options import (
    ArtifactsOpt,
    ExecFlags,
    Globals,
    UsageError,
    current,
    env_pairs,
    read_local_text,
)
from .render import Progress, emit_execution, note, print_json, verbose_note, write

__all__ = ["eval_", "follow", "kill", "logs", "mcp", "run", "submit", "version"]

PathArg = Annotated[
    str | None,
    Parameter(help="A script, a directory, a .tar, or - for stdin (default: stdin if piped)."),
]
FileOpt = Annotated[
    list[Path] | None,
    Parameter(help="A file to include, keeping its relative path (repeatable).", negative=""),
]


def _checked(execution_id: str) -> str:
    try:
        return check_execution_id(execution_id)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _client() -> Client:
    options = current()
    return Client(options.server, token=options.token)


AsyncOpt = Annotated[
    bool,
    Parameter(name="--async", negative="", help="Submit and print the execution id (as `submit`)."),
]


OutputDirOpt = Annotated[
    Path,
    Parameter(help="Where --artifacts files are written, at their relative paths."),
]


def run(
    path: PathArg = None,
    /,
    *,
    file: FileOpt = None,
    async_: AsyncOpt = False,
    output_dir: OutputDirOpt = Path(),
    flags: ExecFlags | None = None,
) -> int:
    """Run a program and wait for it; exits with the script's exit code.

    The script's stdout and stderr go to stdout and stderr. Arguments after ``--``
    are passed to the script. Ctrl-C (or SIGTERM) kills the execution and exits 130.
    With ``--async`` it only submits and prints the execution id, like ``submit``.
    With ``--artifacts``, the matching files the run left are written under
    ``--output-dir`` (default: here), never outside it, and listed on stderr.
    """
    if async_:
        return submit(path, file=file, flags=flags)
    flags = flags or ExecFlags()
    options = current()
    program = gather(path, file, entrypoint=flags.entrypoint)
    printer = LivePrinter(options)
    with program.archive, _client() as client:
        run_options = flags.options(program.entrypoint)
        record = run_to_end(
            client,
            lambda: client.submit(program.archive, run_options).execution_id,
            run_wait(run_options),
            on_submitted=lambda execution_id: verbose_note(options, f"{execution_id} submitted"),
            follow=lambda execution_id, seconds: printer.follow(client, execution_id, seconds),
        )
        listed = _download_artifacts(client, flags.artifacts, record, output_dir)
    printer.finish(record)
    listed()
    return exitcodes.for_execution(record)


def _download_artifacts(
    client: Client, patterns: list[str] | None, record: Execution, output_dir: Path
) -> Callable[[], None]:
    """Write the run's artifacts under ``output_dir`` when ``--artifacts`` asked for
    some; returns what lists them on stderr (called after the run's own output)."""
    if not patterns:
        return lambda: None
    client.download_artifacts(record.execution_id, output_dir)
    return partial(_list_artifacts, current(), record, output_dir)


def _list_artifacts(options: Globals, record: Execution, output_dir: Path) -> None:
    """One line per artifact written, on stderr; a note if some were left out."""
    for item in record.artifacts:
        note(options, f"artifact {item.path} ({item.size} bytes) -> {output_dir / item.path}")
    if record.artifacts_truncated:
        note(options, "some artifacts were left out (the size cap or file count was reached)")


def submit(path: PathArg = None, /, *, file: FileOpt = None, flags: ExecFlags | None = None) -> int:
    """Start a program without waiting; prints its execution id."""
    flags = flags or ExecFlags()
    program = gather(path, file, entrypoint=flags.entrypoint)
    with program.archive, _client() as client:
        submitted = client.submit(program.archive, flags.options(program.entrypoint))
    if current().json:
        print_json({"execution_id": submitted.execution_id, "status": submitted.status.value})
    else:
        write(sys.stdout, submitted.execution_id + "\n")
    return 0


def follow(
    execution_id: str,
    /,
    *,
    tail: Annotated[
        bool, Parameter(help="Print output as it arrives (now always so).", negative="")
    ] = False,
    timeout: Annotated[float, Parameter(help="Give up waiting after this many seconds.")] = 3600,
) -> int:
    """Wait for an execution, printing its output live and its status changes; exits like
    ``run``. A dropped connection is picked up where it broke."""
    execution_id = _checked(execution_id)
    options = current()
    printer = LivePrinter(options, notes=True)
    with _client() as client, _goes_on_if_interrupted(execution_id):
        record = printer.follow(client, execution_id, timeout)
    printer.finish(record)
    return exitcodes.for_execution(record)


@contextlib.contextmanager
def _goes_on_if_interrupted(execution_id: str) -> Iterator[None]:
    """Ctrl-C stops following, not the execution: say so."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; {execution_id} goes on (`pyexec kill {execution_id}` stops it)"
        ) from None


def logs(execution_id: str, /) -> int:
    """Print an execution's output so far (the final output once it is done)."""
    execution_id = _checked(execution_id)
    options = current()
    with _client() as client:
        output = client.logs(execution_id)
    if options.json:
        print_json(
            {
                "execution_id": output.execution_id,
                "status": output.status.value,
                "stdout": output.stdout,
                "stderr": output.stderr,
                "output_truncated": output.output_truncated,
            }
        )
        return 0
    write(sys.stdout, output.stdout)
    if not options.quiet:
        write(sys.stderr, output.stderr)
    note(options, f"{execution_id} {output.status.value}")
    return 0


def kill(execution_id: str, /) -> int:
    """Stop an execution. Killing one that already finished is not an error."""
    execution_id = _checked(execution_id)
    options = current()
    with _client() as client:
        record = client.kill(execution_id)
    if options.json:
        print_json(dict(record.raw))
    elif record.status is Status.KILLED:
        write(sys.stdout, f"{execution_id} killed\n")
    else:
        write(sys.stdout, f"{execution_id} had already finished ({record.status.value})\n")
    return 0


def version() -> int:
    """Print the client's version and the server's version and backend."""
    options = current()
    with _client() as client:
        if not options.json:
            write(sys.stdout, f"client {__version__}\n")
        server = client.version()
    if options.json:
        print_json({"client": __version__, "server": server.version, "backend": server.backend})
    else:
        write(sys.stdout, f"server {server.version} ({server.backend}) at {options.server}\n")
    return 0


def eval_(
    path: Annotated[
        str | None,
        Parameter(help="Code to evaluate, a Python file, or - for stdin."),
    ] = None,
    /,
    *,
    code: Annotated[str | None, Parameter(name=["--code", "-c"], help="Code to evaluate.")] = None,
    python: Annotated[str | None, Parameter(help="Python version, e.g. 3.12.")] = None,
    result: Annotated[
        bool,
        Parameter(
            name=["--result", "--last-expr"],
            negative="--no-result",
            help="Print the value of the last expression, like a REPL (the default).",
        ),
    ] = True,
    auto_requirements: Annotated[
        bool | None, Parameter(help="Install third-party imports the code uses.")
    ] = None,
    requirements: Annotated[Path | None, Parameter(help="requirements.txt to install.")] = None,
    env: Annotated[
        list[str] | None,
        Parameter(help="KEY=VALUE or KEY (local value) for the environment.", negative=""),
    ] = None,
    timeout: Annotated[int | None, Parameter(help="Time limit of the run, seconds.")] = None,
    memory: Annotated[int | None, Parameter(help="Memory limit, MiB.")] = None,
    artifacts: ArtifactsOpt = None,
    output_dir: OutputDirOpt = Path(),
) -> int:
    """Evaluate Python code (CODE, ``-c CODE``, a FILE, or stdin); prints its output and the
    last expression's value (``--no-result``: not the value), exits like run. With
    ``--artifacts``, the matching files are written under ``--output-dir`` as by ``run``."""
    options = current()
    path, code = _code_or_file(path, code)
    source = _eval_source(path, code)
    reqs = read_local_text(requirements, "--requirements") if requirements else None
    run_options = RunOptions(
        # A FILE keeps its name, so tracebacks and __file__ show it (else main.py).
        entrypoint=_eval_entrypoint(path),
        requirements=reqs,
        env=env_pairs(env, os.environ),
        args=options.script_args,
        timeout=timeout,
        memory_mb=memory,
        artifacts=tuple(artifacts or ()),
    )
    with _client() as client, Progress(options, "evaluating"):
        # Submitted, then awaited: an interrupt can then kill it on the server (as run does).
        record: Execution = run_to_end(
            client,
            lambda: (
                client.submit_eval(
                    source,
                    python_version=python,
                    last_expr=result,
                    auto_requirements=auto_requirements,
                    options=run_options,
                ).execution_id
            ),
            run_wait(run_options, setup=True),
            on_submitted=lambda execution_id: verbose_note(options, f"{execution_id} submitted"),
        )
        listed = _download_artifacts(client, artifacts, record, output_dir)
    emit_execution(options, record)
    listed()
    return exitcodes.for_execution(record)


def mcp() -> int:
    """Serve pyexec's tools to an MCP client over stdio (run_python, ...; see docs/mcp.md).

    The tools run code on the server given by --server / PYEXEC_SERVER, with --token.
    """
    try:
        from pyexec.mcp.stdio import serve_stdio
    except ImportError as exc:
        raise UsageError(f"the MCP server needs `pip install 'pyexec[mcp]'` ({exc})") from None
    options = current()
    serve_stdio(options.server, options.token)
    return 0


def _code_or_file(path: str | None, code: str | None) -> tuple[str | None, str | None]:
    """The positional argument as (FILE, CODE): code unless it names a file.

    ``pyexec eval 'x = 5\\nx * 2'`` is code (the seed CLI's habit); an existing path, or
    a word ending in ``.py``, is a FILE (a missing one is then reported as missing).
    """
    if path is None or path == STDIN or code is not None:
        return path, code
    looks_like_file = path.endswith(".py") and not any(c.isspace() for c in path)
    if looks_like_file or Path(path).is_file():
        return path, None
    return None, path


def _with_newline_escapes(code: str) -> str:
    r"""Code typed on one line with ``\n`` for newlines (``'x = 5\nx * 2'``), made real.

    Only when the code as typed does not compile and the decoded code does, so a string
    literal such as ``print("a\nb")`` keeps its escape.
    """
    if "\\n" not in code or "\n" in code or _compiles(code):
        return code
    decoded = code.replace("\\n", "\n")
    return decoded if _compiles(decoded) else code


def _compiles(code: str) -> bool:
    try:
        compile(code, "<eval>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    except (SyntaxError, ValueError):
        return False
    return True


def _eval_entrypoint(path: str | None) -> str | None:
    name = Path(path).name if path not in (None, STDIN) else ""
    return name if name.endswith(".py") and name != ".py" else None


def _eval_source(path: str | None, code: str | None) -> str:
    if code is not None:
        if path is not None:
            raise UsageError("give either -c CODE or a FILE, not both")
        return _with_newline_escapes(code)
    if path is None or path == STDIN:
        stdin = process_stdin()
        if path is None and stdin.isatty():
            raise UsageError("no code given: pass -c CODE, a FILE, or pipe code on stdin")
        try:
            text = stdin.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"stdin is not UTF-8 text: {exc}") from None
        if not text.strip():
            raise UsageError("stdin is empty; pass -c CODE or a FILE")
        return text
    return read_local_text(Path(path))
