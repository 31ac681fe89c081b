"""Turn what the user gave (``--file``, a path, stdin) into an archive and an entrypoint.

Precedence: ``--file PATH`` (repeatable), an explicit ``.tar``, a directory, a single
file, stdin (``-`` or a pipe). A terminal on stdin with nothing else is a usage error,
never a hang.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, BinaryIO

import attrs

from pyexec.client import (
    ArchiveError,
    archive_names,
    tar_from_directory,
    tar_from_files,
    tar_from_stream,
)

from .options import UsageError

__all__ = ["STDIN", "Program", "gather", "pick_entrypoint", "process_stdin"]

#: How a ``-`` argument reaches the commands (the meta app rewrites it: cyclopts would
#: take a bare ``-`` for an option).
STDIN = "/dev/stdin"

NO_INPUT = (
    "no program given: pass a script, a directory, a .tar, --file PATH, or pipe a script "
    "or a tar on stdin"
)


#: Archives the server cannot take as they are (it runs uncompressed tars).
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst")


@attrs.frozen
class Program:
    """An archive ready to upload (the caller closes it) and the script to run in it."""

    archive: BinaryIO
    entrypoint: str
    names: tuple[str, ...]


def process_stdin() -> IO[bytes]:
    """This process's stdin as bytes; an empty stream when it is closed (``<&-``)."""
    stream = sys.stdin  # None when file descriptor 0 was closed at start-up
    return stream.buffer if stream is not None else io.BytesIO()


def pick_entrypoint(names: Sequence[str], requested: str | None) -> str:
    """``requested``, else ``main.py``, ``__main__.py``, the first ``.py`` file, the only file."""
    listing = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    if requested is not None:
        if requested not in names:
            raise UsageError(f"entrypoint {requested!r} is not in the archive (files: {listing})")
        return requested
    for candidate in ("main.py", "__main__.py"):
        if candidate in names:
            return candidate
    scripts = sorted(n for n in names if n.endswith(".py"))
    if scripts:
        return scripts[0]
    if len(names) == 1:
        return names[0]
    raise UsageError(f"cannot tell which file to run; pass --entrypoint (files: {listing})")


def _archive_for(
    path: str | None, files: Sequence[Path], stdin: IO[bytes], stdin_is_tty: bool, stdin_name: str
) -> BinaryIO:
    if files:
        if path is not None:
            raise UsageError("give either --file PATH or a PATH argument, not both")
        return tar_from_files(files)
    if path is None and stdin_is_tty:
        raise UsageError(NO_INPUT)
    if path is None or path in ("-", STDIN):
        try:
            return tar_from_stream(stdin, name=stdin_name)
        except ArchiveError as exc:
            if "empty" in str(exc):
                raise UsageError(f"stdin is empty; {NO_INPUT}") from None
            raise
    target = Path(path)
    if target.is_dir():
        return tar_from_directory(target)
    if not target.exists():
        if path.startswith("-"):
            raise UsageError(f"unknown option {path} (see --help)")
        raise UsageError(f"{path}: no such file or directory")
    if path.lower().endswith(COMPRESSED_TARS):
        raise UsageError(
            f"{path} is a compressed tar; pyexec uploads uncompressed ones: "
            "decompress it (gunzip, xz -d, ...) or pass the directory"
        )
    if target.suffix == ".tar":
        archive = target.open("rb")
        try:
            archive_names(archive)
        except BaseException:
            archive.close()
            raise
        return archive
    return tar_from_files([target], root=target.parent)


def gather(
    path: str | None,
    files: Sequence[Path] | None = None,
    *,
    entrypoint: str | None = None,
    stdin: IO[bytes] | None = None,
) -> Program:
    """The program to run; raises ``UsageError`` or ``ArchiveError`` with a clear message."""
    if stdin is None:
        stdin = process_stdin()
    stdin_is_tty = bool(getattr(stdin, "isatty", lambda: False)())
    archive = _archive_for(path, files or (), stdin, stdin_is_tty, entrypoint or "main.py")
    try:
        names = tuple(archive_names(archive))
        if not names:
            raise UsageError("the archive holds no files")
        return Program(archive, pick_entrypoint(names, entrypoint), names)
    except BaseException:
        archive.close()
        raise
