"""Build the uncompressed tars the server runs, deterministically.

The same input always gives the same bytes: entries are sorted by name and carry
a fixed mtime, owner and mode (0644, or 0755 for executables). Only regular
files are archived. Archive names must stay inside the archive (no absolute
paths, no ``..``); anything else raises ``ArchiveError``.

Large inputs never sit in memory twice: archives above ``SPOOL_LIMIT`` bytes are
built in an anonymous temporary file and uploaded from it.
"""

from __future__ import annotations

import fnmatch
import io
import itertools
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, BinaryIO

import attrs

from .errors import ArchiveError

__all__ = [
    "DEFAULT_IGNORE",
    "IGNORE_FILE",
    "SPOOL_LIMIT",
    "archive_names",
    "is_tar",
    "safe_name",
    "tar_from_directory",
    "tar_from_files",
    "tar_from_mapping",
    "tar_from_stream",
]

#: Archives up to this size are built in memory, larger ones in a temporary file.
SPOOL_LIMIT = 8 * 1024 * 1024
#: Names never archived from a directory.
DEFAULT_IGNORE = (".git", "__pycache__", ".venv")
#: A file at the top of a directory listing more patterns to skip (one per line).
IGNORE_FILE = ".pyexecignore"
_CHUNK = 64 * 1024


def safe_name(name: str) -> str:
    """``name`` as a relative POSIX path inside the archive, or ``ArchiveError``."""
    posix = name.replace("\\", "/")
    while posix.startswith("./"):
        posix = posix[2:]
    parts = posix.split("/")
    if (
        not posix
        or posix.startswith("/")
        or (len(parts[0]) == 2 and parts[0][1] == ":")
        or any(part in {"", ".", ".."} for part in parts)
        or "\x00" in posix
    ):
        raise ArchiveError(f"{name!r} is not a relative path inside the archive")
    return posix


@attrs.frozen
class _Entry:
    name: str
    size: int
    executable: bool
    content: bytes | None = None  # one of content, path, stream
    path: Path | None = None
    stream: IO[bytes] | None = None

    def open(self) -> IO[bytes]:
        if self.content is not None:
            return io.BytesIO(self.content)
        if self.stream is not None:
            return self.stream
        assert self.path is not None
        return self.path.open("rb")


def _write(entries: Iterable[_Entry]) -> BinaryIO:
    """The tar of ``entries`` (sorted, duplicates refused), positioned at its start."""
    ordered = sorted(entries, key=lambda e: e.name)
    for a, b in itertools.pairwise(ordered):
        if a.name == b.name:
            raise ArchiveError(f"{a.name!r} appears twice in the archive")
    total = sum(e.size + 1024 for e in ordered)
    out: BinaryIO = io.BytesIO() if total <= SPOOL_LIMIT else tempfile.TemporaryFile()  # noqa: SIM115 - returned open, the caller closes it
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in ordered:
                info = tarfile.TarInfo(entry.name)
                info.size = entry.size
                info.mode = 0o755 if entry.executable else 0o644
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with entry.open() as fh:
                    tar.addfile(info, fh)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return out


def tar_from_mapping(files: Mapping[str, str | bytes]) -> bytes:
    """A tar holding ``files`` (archive name → text or bytes; text is UTF-8 encoded)."""
    if not files:
        raise ArchiveError("no files to archive")
    entries = []
    for name, content in files.items():
        data = content.encode() if isinstance(content, str) else bytes(content)
        entries.append(_Entry(safe_name(name), len(data), False, content=data))
    with _write(entries) as out:
        return out.read()


def _file_entry(name: str, path: Path) -> _Entry:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"{path} is not a regular file")
    return _Entry(safe_name(name), st.st_size, bool(st.st_mode & 0o111), path=path)


def tar_from_files(
    paths: Iterable[str | os.PathLike[str]], *, root: str | os.PathLike[str] = "."
) -> BinaryIO:
    """A tar of ``paths``, each named by its path relative to ``root`` (``src/a.py`` stays so).

    A path outside ``root`` raises ``ArchiveError``. The caller closes the result.
    """
    base = Path(root).resolve()
    entries: dict[str, _Entry] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            raise ArchiveError(f"{path} is a directory; archive it with tar_from_directory")
        if not path.exists():
            raise ArchiveError(f"{path}: no such file")
        absolute = path.absolute()
        relative = os.path.relpath(absolute, base)
        if relative == ".." or relative.startswith(("../", "..\\")) or os.path.isabs(relative):
            raise ArchiveError(f"{path} is outside {base}; files must sit below it")
        entry = _file_entry(relative, absolute)
        entries[entry.name] = entry
    if not entries:
        raise ArchiveError("no files to archive")
    return _write(entries.values())


def _ignore_patterns(root: Path, extra: Iterable[str]) -> list[str]:
    patterns = [*DEFAULT_IGNORE, *extra]
    ignore_file = root / IGNORE_FILE
    if ignore_file.is_file():
        for line in ignore_file.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line)
    return patterns


def _ignored(relative: str, is_dir: bool, patterns: list[str]) -> bool:
    """gitignore-like: ``name`` matches any component, ``a/b`` the path, ``dir/`` dirs only."""
    basename = relative.rsplit("/", 1)[-1]
    for pattern in patterns:
        if pattern.endswith("/"):
            if not is_dir:
                continue
            pattern = pattern.rstrip("/")
        if "/" in pattern:
            if fnmatch.fnmatchcase(relative, pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(basename, pattern):
            return True
    return False


def _walk(root: Path, patterns: list[str]) -> Iterator[_Entry]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        prefix = here.relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not _ignored(prefix + d, True, patterns) and not (here / d).is_symlink()
        )
        for name in filenames:
            relative = prefix + name
            if _ignored(relative, False, patterns):
                continue
            path = here / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(root) or not target.is_file():
                    raise ArchiveError(f"{path} links outside {root}")
                path = target
            yield _file_entry(relative, path)


def tar_from_directory(
    directory: str | os.PathLike[str], *, ignore: Iterable[str] = ()
) -> BinaryIO:
    """A tar of the files below ``directory``, named relative to it.

    Skips ``.git``, ``__pycache__``, ``.venv``, the patterns in ``ignore`` and those
    listed in ``directory/.pyexecignore`` (``name`` matches a file or directory name
    anywhere, ``a/b*`` a path from the top, ``build/`` directories only). Symbolic
    links to files inside the directory are archived as the file; links to
    directories are not followed. The caller closes the result.
    """
    root = Path(directory).resolve()
    if not root.is_dir():
        raise ArchiveError(f"{directory} is not a directory")
    entries = list(_walk(root, _ignore_patterns(root, ignore)))
    if not entries:
        raise ArchiveError(f"{directory} holds no files to archive")
    return _write(entries)


def is_tar(head: bytes) -> bool:
    """Whether ``head`` (the first 512 bytes or more) starts a POSIX/GNU tar."""
    return len(head) >= 512 and head[257:262] == b"ustar"


def _spool(stream: IO[bytes]) -> BinaryIO:
    """``stream`` copied into memory, or into a temporary file once it outgrows ``SPOOL_LIMIT``."""
    head = stream.read(SPOOL_LIMIT + 1)
    if len(head) <= SPOOL_LIMIT:
        return io.BytesIO(head)
    out = tempfile.TemporaryFile()  # noqa: SIM115 - returned open, the caller closes it
    out.write(head)
    shutil.copyfileobj(stream, out, _CHUNK)
    out.seek(0)
    return out


def tar_from_stream(stream: IO[bytes], *, name: str = "main.py") -> BinaryIO:
    """The content of ``stream``: as is if it is already a tar, else as the single file ``name``.

    The stream is read once; ``ArchiveError`` if it is empty. The caller closes the result.
    """
    spool = _spool(stream)
    try:
        head = spool.read(512)
        spool.seek(0)
        if is_tar(head):
            archive_names(spool)  # a readable tar, or ArchiveError
            return spool
        size = spool.seek(0, os.SEEK_END)
        spool.seek(0)
        if size == 0:
            raise ArchiveError("the input is empty")
        with spool:
            return _write([_Entry(safe_name(name), size, False, stream=spool)])
    except BaseException:
        spool.close()
        raise


def archive_names(fileobj: IO[bytes]) -> list[str]:
    """Names of the regular files in a tar, sorted; the position is restored."""
    start = fileobj.tell()
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            names = sorted(m.name for m in tar.getmembers() if m.isfile())
    except tarfile.TarError as exc:
        raise ArchiveError(f"not a readable tar: {exc}") from None
    finally:
        fileobj.seek(start)
    return names
