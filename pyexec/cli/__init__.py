"""The ``pyexec`` command line (cyclopts).

Commands live in small modules (``commands``, ``serve``); this module assembles them.
Global options (``--server``, ``--token``, ``-q``, ``-v``, ``--json``) are parsed by the
meta app wherever they appear, and everything after ``--`` goes to the script.

Adding a command group is one line below, e.g.
``app.command("pyexec.cli.nomad_cmds:job_app", name="job")`` (import paths load lazily,
so ``pyexec --help`` never imports server code).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated

from cyclopts import App, Parameter

from pyexec.__about__ import __version__
from pyexec.client import (
    DEFAULT_SERVER,
    APIError,
    ArchiveError,
    AuthenticationError,
    ClientError,
    InvalidServerURL,
    NotFoundError,
    WaitTimeout,
)

from . import commands, exitcodes
from .inputs import STDIN
from .options import Globals, UsageError, activate
from .serve import serve

__all__ = ["app", "main", "run_cli"]

app = App(
    name="pyexec",
    help="Run Python in locked-down containers on a pyexec server.",
    version=__version__,
    result_action="return_value",
)
# cyclopts would turn Ctrl-C into a silent exit 130; run_cli reports it (after run killed
# its execution). The meta app does not inherit the setting.
app.suppress_keyboard_interrupt = app.meta.suppress_keyboard_interrupt = False
app.command(commands.run)
app.command(commands.submit)
app.command(commands.follow)
app.command(commands.logs)
app.command(commands.kill)
app.command(commands.version)
app.command(commands.eval_, name="eval")
app.command(commands.mcp)
app.command(serve)
# Lazy (import path) commands: their help is given here so `pyexec --help` can list them
# without importing their modules.
app.command(
    "pyexec.configref:config_reference",
    name="config-reference",
    help="Print the configuration reference (every PYEXEC_* setting) from the settings class.",
)
app.command(
    "pyexec.cli.nomad_cmds:job_app",
    name="job",
    help="Render or register the Nomad runner jobs (talks to Nomad, not to a pyexec server).",
)
app.command(
    "pyexec.cli.nomad_cmds:bundle_app",
    name="bundle",
    help="Upload a bundle to Consul for runs dispatched with `nomad job dispatch`.",
)
app.command(
    "pyexec.cli.cache_cmds:cache_app",
    name="cache",
    help="List or prune this host's dependency cache (reads PYEXEC_DEPS_CACHE_DIR, no server).",
)
app.register_install_completion_command(add_to_startup=False)


@app.meta.default
def _launcher(
    *tokens: Annotated[str, Parameter(show=False, allow_leading_hyphen=True)],
    server: Annotated[
        str, Parameter(env_var="PYEXEC_SERVER", help="URL of the pyexec server.")
    ] = DEFAULT_SERVER,
    token: Annotated[
        str | None, Parameter(env_var="PYEXEC_TOKEN", help="Bearer token for the server.")
    ] = None,
    quiet: Annotated[
        bool, Parameter(name=["--quiet", "-q"], negative="", help="Print the script's stdout only.")
    ] = False,
    verbose: Annotated[
        bool,
        Parameter(
            name=["--verbose", "-v"],
            negative="",
            help="Also print the execution id and metadata on stderr.",
        ),
    ] = False,
    json: Annotated[
        bool, Parameter(negative="", help="Print the full record as JSON on stdout.")
    ] = False,
) -> object:
    command, script_args = _split_script_args(tokens)
    options = Globals(
        server=server,
        token=token or None,
        quiet=quiet,
        verbose=verbose,
        json=json,
        script_args=script_args,
    )
    activate(options)
    return app(command, result_action="return_value")


def _split_script_args(tokens: Sequence[str]) -> tuple[list[str], tuple[str, ...]]:
    """The command's tokens (a bare ``-`` meaning stdin) and the script's, after ``--``."""
    cut = tokens.index("--") if "--" in tokens else len(tokens)
    command = [STDIN if word == "-" else word for word in tokens[:cut]]
    return command, tuple(tokens[cut + 1 :])


def _explain(exc: ClientError, server: str) -> str:
    if isinstance(exc, AuthenticationError):
        return f"{exc} - pass --token or set PYEXEC_TOKEN"
    wrong_place = isinstance(exc, NotFoundError) and exc.code != "execution_not_found"
    not_ours = isinstance(exc, APIError) and (
        exc.code.startswith("http_") or exc.code == "invalid_response"
    )
    if wrong_place or not_ours:
        return f"{exc} - is {server} a pyexec server?"
    return str(exc)


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run the command line in-process and return its exit code (tests call this)."""
    from .options import current

    tokens = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app.meta(tokens, result_action="return_value")
    except SystemExit as exc:  # cyclopts ends --help, --version and parse errors this way
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (UsageError, InvalidServerURL, ArchiveError) as exc:  # local input: nothing was sent
        sys.stderr.write(f"pyexec: {exc}\n")
        return exitcodes.USAGE
    except WaitTimeout as exc:
        sys.stderr.write(f"pyexec: {exc}\n")
        return exitcodes.GAVE_UP_WAITING
    except ClientError as exc:
        sys.stderr.write(f"pyexec: {_explain(exc, current().server)}\n")
        return exitcodes.PYEXEC_ERROR
    except KeyboardInterrupt as exc:  # run: Interrupted says whether the execution was killed
        sys.stderr.write(f"pyexec: {exc or 'interrupted'}\n")
        return exitcodes.KILLED
    return result if isinstance(result, int) else 0


def main() -> None:
    """The ``pyexec`` console script."""
    sys.exit(run_cli())
