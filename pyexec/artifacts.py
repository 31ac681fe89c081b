"""Output files of a run (``artifacts``): request patterns, and the host's check of what a
sandbox sent back.

The sandbox collects (``pyexec.sandbox.collect``: the glob rules, the walk without
following links) and sends an uncompressed tar: the local runner reads it from the
bootstrap's stdout after the program (``ArtifactStream``), the Nomad runner from the
allocation directory. ``read_artifacts`` then takes that tar as untrusted input: every
member passes the upload rules (``TarChecker``) again, only regular files whose path
matches the request's patterns are kept, sizes and SHA-256 are computed here, and the
total stops at the cap exactly. What it keeps becomes a new tar written here (the
*blob* the store keeps), whose members' data offsets the record remembers, so one
file can be served without reading the others.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import Sequence
from typing import IO, Any, BinaryIO, cast

import attrs

from .models import Artifact
from .sandbox.collect import check_artifacts
from .sandbox.tarcheck import TarChecker, member_kind

__all__ = [
    "ARTIFACTS_MARK",
    "INLINE_ARTIFACT_BYTES",
    "MAX_ARTIFACT_FILES",
    "ArtifactStream",
    "Collected",
    "blob_overhead",
    "new_nonce",
    "read_artifacts",
]

log = logging.getLogger("pyexec.artifacts")

#: Most files one run returns (past it, ``artifacts_truncated``).
MAX_ARTIFACT_FILES = 1000
#: Eval's ``inline_artifacts`` returns files up to this size, base64-encoded.
INLINE_ARTIFACT_BYTES = 1024 * 1024
#: Kept in memory while spooling a blob; more goes to a temporary file.
_SPOOL_MEMORY = 1024 * 1024
_BLOCK = 512
#: How the bootstrap's mark line on stdout begins (the nonce and a newline follow).
ARTIFACTS_MARK = b"\0pyexec artifacts "


def new_nonce() -> str:
    """What marks the start of the artifacts on a sandbox's stdout (one per run)."""
    return secrets.token_hex(16)


def blob_overhead(max_files: int = MAX_ARTIFACT_FILES) -> int:
    """Most tar bytes besides file data a sandbox may send: a pax header and a ustar
    header per file (long names), padding, the end blocks."""
    return (max_files + 1) * 6 * _BLOCK + 20 * _BLOCK


@attrs.frozen(kw_only=True, eq=False)
class Collected:
    """What ``read_artifacts`` kept: the files, whether some were left out, and the blob
    (a tar of exactly those files, rewound; ``None`` when there are none)."""

    files: tuple[Artifact, ...] = ()
    truncated: bool = False
    blob: BinaryIO | None = None

    def close(self) -> None:
        if self.blob is not None:
            self.blob.close()


def read_artifacts(
    source: IO[bytes] | None, patterns: Sequence[str], cap: int, *, truncated: bool = False
) -> Collected:
    """Check the tar a sandbox sent in ``source`` and keep what passes (see the module's
    docstring; the rules are ``pyexec.sandbox.collect.check_artifacts``). Blocking. A tar
    that breaks the rules, or ends before the collector's last member, keeps the files
    before the break and counts as ``truncated``."""
    if source is None:
        return Collected(truncated=truncated)
    spool: Any = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115 - returned
    try:
        kept, cut = check_artifacts(
            source,
            spool,
            list(patterns),
            cap,
            MAX_ARTIFACT_FILES,
            TarChecker(MAX_ARTIFACT_FILES + 1, cap),
            member_kind,
        )
    except BaseException:
        spool.close()
        raise
    if cut:
        log.warning("artifacts were left out or refused (cap, file count or tar rules)")
    if not kept:
        spool.close()
        return Collected(truncated=truncated or cut)
    spool.seek(0)
    files = tuple(
        Artifact(path=path, size=size, sha256=sha, offset=offset)
        for path, size, sha, offset in kept
    )
    return Collected(files=files, truncated=truncated or cut, blob=cast(BinaryIO, spool))


class ArtifactStream:
    """Splits a sandbox's stdout into the program's output and the artifacts tar after it.

    The bootstrap writes ``\\0pyexec artifacts <nonce>\\n`` once the program and
    everything it started are gone, then the tar. The nonce is fresh per run (in the
    spec, which the program never sees), so output cannot pose as the mark by chance.
    Bytes that may begin the mark are held back until more arrive. The tar is spooled
    up to ``limit`` bytes (more: dropped, and the artifacts count as truncated).
    """

    def __init__(self, nonce: str, limit: int) -> None:
        self.mark = ARTIFACTS_MARK + nonce.encode("ascii") + b"\n"
        self.limit = limit
        self._held = b""
        self._spool: Any = None
        self._size = 0
        self.overflow = False

    @property
    def started(self) -> bool:
        return self._spool is not None

    def feed(self, data: bytes) -> bytes:
        """Take ``data`` from stdout; returns what of it is the program's."""
        if self._spool is not None:
            self._keep(data)
            return b""
        buf = self._held + data
        start = buf.find(self.mark)
        if start >= 0:
            self._held = b""
            self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY)  # noqa: SIM115
            self._keep(buf[start + len(self.mark) :])
            return buf[:start]
        keep = _partial_mark(buf, self.mark)
        self._held = buf[len(buf) - keep :] if keep else b""
        return buf[: len(buf) - keep]

    def finish(self) -> bytes:
        """At the end of stdout: held bytes that were not the mark."""
        held, self._held = self._held, b""
        return held

    def _keep(self, data: bytes) -> None:
        room = self.limit - self._size
        if len(data) > room:
            data, self.overflow = data[: max(room, 0)], True
        if data:
            self._spool.write(data)
            self._size += len(data)

    def collected(self, patterns: Sequence[str], cap: int) -> Collected:
        """The checked artifacts (blocking); none if the mark never came."""
        spool, self._spool = self._spool, None
        if spool is None:
            return Collected()
        try:
            spool.seek(0)
            return read_artifacts(spool, patterns, cap, truncated=self.overflow)
        finally:
            spool.close()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None


def _partial_mark(buf: bytes, mark: bytes) -> int:
    """Length of the longest end of ``buf`` that begins ``mark``."""
    start = buf.rfind(b"\0", max(0, len(buf) - len(mark)))
    while start >= 0:
        tail = buf[start:]
        if mark.startswith(tail):
            return len(tail)
        start = buf.rfind(b"\0", max(0, len(buf) - len(mark)), start)
    return 0
