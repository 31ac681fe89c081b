"""Checking and extracting uploaded tars without trusting them.

``validate_tar`` walks an uploaded (uncompressed) archive header by header and
rejects anything that could write outside the extraction directory, any special
file, and archives that are too big once unpacked; it never reads the archive
into memory. ``safe_extract`` unpacks with the same rules checked member by member
before anything of that member is written. The rules themselves live in
``pyexec.sandbox.tarcheck`` because the in-container bootstrap applies them again.
"""

from __future__ import annotations

import os
import tarfile
from typing import BinaryIO, cast

import attrs

from .errors import PayloadTooLarge, TarRejected
from .sandbox.tarcheck import (
    FILE,
    HARDLINK,
    SYMLINK,
    TarChecker,
    TarProblem,
    member_kind,
)
from .settings import Settings

__all__ = ["TarSummary", "member_kind", "safe_extract", "validate_tar"]

#: Read size when the archive has to be streamed (not seekable).
_STREAM_BUFSIZE = 1024 * 1024
# The service's defaults, for callers without settings at hand.
_DEFAULT_MAX_ENTRIES = Settings().max_tar_entries
_DEFAULT_MAX_BYTES = Settings().max_extracted_bytes
#: Largest single read while walking headers (a pax or long-name header's data).
_MAX_HEADER_READ = 1024 * 1024
_TOO_LARGE = {"tar_too_many_entries", "tar_too_much_data"}


@attrs.frozen
class TarSummary:
    entries: int
    total_bytes: int


def _rejected(problem: TarProblem) -> TarRejected | PayloadTooLarge:
    if problem.code in _TOO_LARGE:
        return PayloadTooLarge(problem.message, code=problem.code)
    return TarRejected(problem.message, code=problem.code)


class _HeadersOnly:
    """A seekable upload as tarfile sees it while hopping from header to header.

    tarfile reads pax and GNU long-name headers whole; refusing big reads keeps a
    crafted multi-megabyte header from being loaded into memory.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.seek = raw.seek
        self.tell = raw.tell

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > _MAX_HEADER_READ:
            raise TarProblem("tar_invalid", "the archive has an oversized metadata header")
        return self._raw.read(size)


def _open(fileobj: BinaryIO) -> tarfile.TarFile:
    # A seekable upload (a spooled temporary file) lets tarfile hop from header to
    # header; otherwise it has to read the data between them.
    if fileobj.seekable():
        # tarfile needs only read/seek/tell of it.
        return tarfile.open(fileobj=cast(BinaryIO, _HeadersOnly(fileobj)), mode="r:")
    return tarfile.open(fileobj=fileobj, mode="r|", bufsize=_STREAM_BUFSIZE)


def validate_tar(
    fileobj: BinaryIO, *, entrypoint: str | None, max_entries: int, max_bytes: int
) -> TarSummary:
    """Check every member of the tar in ``fileobj``; raise ``TarRejected``/``PayloadTooLarge``.

    ``entrypoint`` (a relative path) must name a file in the archive unless it is ``None``.
    A seekable ``fileobj`` is left rewound to where it started.
    """
    start = fileobj.tell() if fileobj.seekable() else None
    checker = TarChecker(max_entries, max_bytes)
    try:
        with _open(fileobj) as archive:
            while (member := archive.next()) is not None:
                checker.add(member.name, member_kind(member), member.size, member.linkname)
                # tarfile keeps every member it has read; a summary needs none of them.
                archive.members.clear()  # type: ignore[attr-defined]  # missing from typeshed
    except TarProblem as problem:
        raise _rejected(problem) from None
    except (tarfile.TarError, EOFError, UnicodeError) as exc:
        raise TarRejected(f"not a readable uncompressed tar: {exc}", code="tar_invalid") from None
    finally:
        if start is not None:
            fileobj.seek(start)
    if entrypoint is not None and checker.kinds.get(entrypoint) not in {FILE, HARDLINK, SYMLINK}:
        raise TarRejected(
            f"the entrypoint {entrypoint!r} is not a file in the archive",
            code="entrypoint_not_found",
            entrypoint=entrypoint,
        )
    return TarSummary(entries=checker.entries, total_bytes=checker.total_bytes)


def safe_extract(
    fileobj: BinaryIO,
    dest: str | os.PathLike[str],
    *,
    max_entries: int = _DEFAULT_MAX_ENTRIES,
    max_bytes: int = _DEFAULT_MAX_BYTES,
) -> TarSummary:
    """Extract the tar in ``fileobj`` into the existing directory ``dest``.

    Each member is checked (with every member before it) before it is written, so a
    rejected archive may leave earlier members in ``dest`` but never anything outside it.
    """
    checker = TarChecker(max_entries, max_bytes)
    try:
        with tarfile.open(fileobj=fileobj, mode="r|", bufsize=_STREAM_BUFSIZE) as archive:
            extract_checked(archive, os.fspath(dest), checker)
    except TarProblem as problem:
        raise _rejected(problem) from None
    except (tarfile.TarError, EOFError, UnicodeError) as exc:
        raise TarRejected(f"the tar cannot be extracted: {exc}", code="tar_invalid") from None
    return TarSummary(entries=checker.entries, total_bytes=checker.total_bytes)


def extract_checked(archive: tarfile.TarFile, dest: str, checker: TarChecker) -> None:
    """Extract ``archive`` (stream mode is fine) into ``dest``, each member checked before
    anything of it is written; modes are tamed and owners never taken from the tar."""
    for member in archive:
        path = checker.add(member.name, member_kind(member), member.size, member.linkname)
        if path is None:
            continue
        member.name = path
        if member.islnk():
            member.linkname = checker.normalize(member.linkname)
        keep = 0o700 if member.isdir() else 0o600
        member.mode = (member.mode & 0o755) | keep
        archive.extract(member, dest, filter="data")
