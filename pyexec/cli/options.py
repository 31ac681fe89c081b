"""Options shared by several commands: the global ones and the execution flags.

Global options may come before or after the command (``pyexec -q run`` and
``pyexec run -q``): the meta app (``pyexec.cli``) parses them wherever they are and
keeps them here for the command to read. Arguments after ``--`` go to the script.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import attrs
from cyclopts import Parameter

from pyexec.client import DEFAULT_SERVER, RunOptions

__all__ = ["ExecFlags", "Globals", "UsageError", "current", "env_pairs", "read_local_text"]


class UsageError(Exception):
    """Bad arguments or local input; printed as one line, exit code 2."""


@attrs.frozen(kw_only=True)
class Globals:
    server: str = DEFAULT_SERVER
    token: str | None = None
    quiet: bool = False
    verbose: bool = False
    json: bool = False
    #: Everything after ``--`` on the command line.
    script_args: tuple[str, ...] = ()

    @property
    def chatty(self) -> bool:
        """Whether notes and progress may go to stderr."""
        return not (self.quiet or self.json)


_current: contextvars.ContextVar[Globals] = contextvars.ContextVar("pyexec_globals")


def current() -> Globals:
    return _current.get(Globals())


def activate(options: Globals) -> contextvars.Token[Globals]:
    return _current.set(options)


def read_local_text(path: Path, label: str = "") -> str:
    """A local UTF-8 file's text, or a ``UsageError`` naming it (``label``: the option)."""
    where = f"{label} {path}" if label else str(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 text") from None


def env_pairs(items: list[str] | None, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """``--env KEY=VALUE`` as is; ``--env KEY`` takes the value from the local environment."""
    pairs = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not key:
            raise UsageError(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in environ:
                raise UsageError(f"--env {key}: {key} is not set in the local environment")
            value = environ[key]
        pairs.append((key, value))
    return tuple(pairs)


#: ``--artifacts``, for every command that runs a program (``run``, ``submit``, ``eval``).
ArtifactsOpt = Annotated[
    list[str] | None,
    Parameter(
        help="Glob of output files to bring back, relative to the working directory, "
        "e.g. 'out/*.png' or 'results/**' (repeatable); `run` and `eval` write them to "
        "--output-dir.",
        negative="",
    ),
]


@Parameter(name="*")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ExecFlags:
    """How to run: limits, image, setup. Unset flags leave the server's defaults."""

    entrypoint: Annotated[
        str | None, Parameter(help="Script to run inside the archive (default: auto-detected).")
    ] = None
    timeout: Annotated[int | None, Parameter(help="Time limit of the run, seconds.")] = None
    memory: Annotated[int | None, Parameter(help="Memory limit, MiB.")] = None
    disk: Annotated[int | None, Parameter(help="Size of the writable /work, MiB.")] = None
    cpu: Annotated[int | None, Parameter(help="Relative CPU weight (shares).")] = None
    network: Annotated[
        bool | None, Parameter(help="Let the script use the network (if the server allows it).")
    ] = None
    image: Annotated[str | None, Parameter(help="Container image to run in.")] = None
    requirements: Annotated[
        Path | None, Parameter(help="requirements.txt to install before the run.")
    ] = None
    pre_command: Annotated[
        list[str] | None,
        Parameter(help="Shell command to run before the script (repeatable).", negative=""),
    ] = None
    env: Annotated[
        list[str] | None,
        Parameter(
            help="KEY=VALUE for the script's environment, or KEY to pass the local value "
            "(repeatable).",
            negative="",
        ),
    ] = None
    artifacts: ArtifactsOpt = None

    def options(self, entrypoint: str, environ: Mapping[str, str] | None = None) -> RunOptions:
        requirements = None
        if self.requirements is not None:
            requirements = read_local_text(self.requirements, "--requirements")
        return RunOptions(
            entrypoint=entrypoint,
            image=self.image,
            requirements=requirements,
            pre_commands=tuple(self.pre_command or ()),
            env=env_pairs(self.env, os.environ if environ is None else environ),
            args=current().script_args,
            timeout=self.timeout,
            memory_mb=self.memory,
            disk_mb=self.disk,
            cpu_shares=self.cpu,
            network=self.network,
            artifacts=tuple(self.artifacts or ()),
        )
