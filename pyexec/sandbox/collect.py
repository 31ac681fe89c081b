"""Which files of a run are its artifacts: the glob rules and the collector (stdlib only).

A pattern is a ``/``-separated path relative to the working directory; in a part,
``*`` matches any run of characters but ``/``, ``?`` one character, ``[...]`` a set
(``fnmatch``); a part that is exactly ``**`` matches any number of directories (none
included), so ``results/**`` is everything below ``results``. The service checks
patterns with ``check_pattern`` when a request arrives; the sandbox matches files with
``matches`` once the program and everything it started are gone. Both use this module:
the bootstrap appends its source (like ``tarcheck.py``), the Nomad run task ships it.

``write_artifacts`` walks the working directory with directory file descriptors,
never following a symbolic link (``O_NOFOLLOW`` on every open, ``lstat``), skipping
everything but regular files and the sandbox's own ``.pyexec`` directory, and writes
the matched files, in path order, as an uncompressed tar. It stops before the file
that would take the total past ``cap`` bytes, or past ``max_files`` files; an empty
last member says which: ``TRUNCATED``, or ``COMPLETE``. The host checks that tar again
with the upload rules (``pyexec.artifacts``) and computes sizes and digests itself.

Keep it free of module-level imports (and of ``from __future__``), like ``tarcheck.py``.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

#: The last member: the collection stopped at a limit, or went through (never real
#: artifacts: ``.pyexec`` is not collected). A tar without either was cut short.
TRUNCATED = ".pyexec/truncated"
COMPLETE = ".pyexec/complete"
#: The sandbox's own directory in the working directory; never collected.
STATE_DIR = ".pyexec"
MAX_PATTERNS = 32
MAX_PATTERN_LENGTH = 1024
#: Names the collector looks at, at most (a tree of millions of files ends it early).
MAX_ENTRIES_WALKED = 200_000


def check_pattern(pattern: "Any") -> "str | None":
    """Why ``pattern`` is refused, or ``None`` when it is a relative glob inside the
    working directory."""
    if not isinstance(pattern, str):
        return "must be a string"
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        return "must be 1 to " + str(MAX_PATTERN_LENGTH) + " characters"
    if "\x00" in pattern or "\\" in pattern:
        return "must not contain NUL or backslash"
    if pattern.startswith("/"):
        return "must be relative to the working directory, not absolute"
    parts = pattern.split("/")
    if ".." in parts:
        return "must not contain '..'"
    if any(part in ("", ".") for part in parts):
        return "must not contain empty or '.' parts"
    return None


def _part_matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if not any(c in pattern for c in "*?["):
        return pattern == name
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


def _match(pattern: "list[str]", parts: "list[str]", prefix: bool) -> bool:
    """Whether ``parts`` match ``pattern`` (``prefix``: could match something below them)."""
    # Positions in the pattern reachable after consuming a number of parts.
    states = {0}
    for part in parts:
        ahead = set()
        for i in _closure(pattern, states):
            if i < len(pattern):
                if pattern[i] == "**":
                    ahead.add(i)  # ** takes this part and stays
                    if i + 1 == len(pattern):
                        ahead.add(i + 1)  # a last ** has taken at least one part
                elif _part_matches(pattern[i], part):
                    ahead.add(i + 1)
        states = ahead
        if not states:
            return False
    reached = _closure(pattern, states)
    if prefix:
        return any(i < len(pattern) for i in reached)
    return len(pattern) in reached


def _closure(pattern: "list[str]", states: "set[int]") -> "set[int]":
    """``states`` plus where a ``**`` matching no directory leads (not a last ``**``:
    ``results/**`` is what is below ``results``, not ``results`` itself)."""
    out = set(states)
    todo = list(states)
    while todo:
        i = todo.pop()
        if i + 1 < len(pattern) and pattern[i] == "**" and i + 1 not in out:
            out.add(i + 1)
            todo.append(i + 1)
    return out


def matches(patterns: "list[str]", path: str) -> bool:
    """Whether the relative file ``path`` matches one of ``patterns``."""
    parts = path.split("/")
    return any(_match(p.split("/"), parts, False) for p in patterns)


def may_hold(patterns: "list[str]", path: str) -> bool:
    """Whether the directory ``path`` may hold a match (else it is not walked)."""
    parts = path.split("/")
    return any(_match(p.split("/"), parts, True) for p in patterns)


def write_artifacts(
    out: "IO[bytes]", root: str, patterns: "list[str]", cap: int, max_files: int
) -> None:
    """Write the regular files under ``root`` that match ``patterns`` to ``out`` as a tar
    (see the module's docstring); blocking, for a sandbox whose processes are gone."""
    import os
    import stat
    import tarfile

    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    total = 0
    count = 0
    seen = 0
    truncated = False
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as archive:
        stack = [("", os.open(root, flags | os.O_DIRECTORY))]
        try:
            while stack and not truncated:
                where, dir_fd = stack.pop()
                try:
                    names = sorted(os.listdir(dir_fd))
                except OSError:
                    names = []
                below = []
                for name in names:
                    path = where + name
                    seen += 1
                    if seen > MAX_ENTRIES_WALKED:
                        truncated = True
                        break
                    if path == STATE_DIR:
                        continue
                    try:
                        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(info.st_mode):
                        if may_hold(patterns, path):
                            below.append(path)
                        continue
                    if not stat.S_ISREG(info.st_mode) or not matches(patterns, path):
                        continue  # links, devices, fifos, sockets: never
                    if count + 1 > max_files or total + info.st_size > cap:
                        truncated = True
                        break
                    try:
                        fd = os.open(name, flags | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
                    except OSError:
                        continue
                    with os.fdopen(fd, "rb") as fh:
                        opened = os.fstat(fh.fileno())
                        if not stat.S_ISREG(opened.st_mode) or opened.st_size + total > cap:
                            continue
                        member = tarfile.TarInfo(path)
                        member.size = opened.st_size
                        member.mode = 0o644
                        member.mtime = int(opened.st_mtime)
                        archive.addfile(member, fh)
                    total += opened.st_size
                    count += 1
                # Directories after the files beside them, each in path order.
                for path in reversed(below):
                    try:
                        name = path.rsplit("/", 1)[-1]
                        fd = os.open(name, flags | os.O_DIRECTORY, dir_fd=dir_fd)
                    except OSError:
                        continue
                    stack.append((path + "/", fd))
                os.close(dir_fd)
        finally:
            for _, fd in stack:
                os.close(fd)
        archive.addfile(tarfile.TarInfo(TRUNCATED if truncated else COMPLETE))


def check_artifacts(
    source: "IO[bytes]",
    out: "IO[bytes]",
    patterns: "list[str]",
    cap: int,
    max_files: int,
    checker: "Any",
    kind_of: "Any",
) -> "tuple[list[tuple[str, int, str, int]], bool]":
    """Check the tar ``write_artifacts`` made (it comes from the sandbox: untrusted) and
    write what passes to ``out`` as a new tar: ``([(path, size, sha256, data offset)],
    truncated)``. Every member goes through ``checker`` (a ``TarChecker``: the upload
    rules; ``kind_of`` is its ``member_kind``); only regular files matching ``patterns``
    and outside ``.pyexec`` are kept, each name once; the total stops at ``cap`` exactly
    and at ``max_files``. A tar that breaks a rule, or ends before its last member
    (``TRUNCATED`` or ``COMPLETE``), keeps the files before and is truncated."""
    import hashlib
    import tarfile

    kept: list[tuple[str, int, str, int]] = []
    seen = set()
    total = good = 0
    truncated = complete = False
    start = out.tell()
    # Never closed: its end blocks are written below, after the last whole member.
    writer = tarfile.open(fileobj=out, mode="w:", format=tarfile.PAX_FORMAT)  # noqa: SIM115
    try:
        with tarfile.open(fileobj=source, mode="r|") as archive:
            while True:
                member = archive.next()
                if member is None:
                    break
                archive.members.clear()  # type: ignore[attr-defined]  # tarfile keeps them all
                if member.name in (TRUNCATED, COMPLETE):
                    complete = True
                    truncated = member.name == TRUNCATED
                    break
                kind = kind_of(member)
                size = member.size if kind == "file" else 0
                if kind == "file" and (total + size > cap or len(kept) >= max_files):
                    truncated = True
                    break
                path = checker.add(member.name, kind, size, member.linkname)
                if (
                    kind != "file"
                    or path is None
                    or path.split("/")[0] == STATE_DIR
                    or path in seen
                    or not matches(patterns, path)
                ):
                    continue  # links, devices, directories, what was not asked for: never
                data = archive.extractfile(member)
                if data is None:
                    continue
                digest = hashlib.sha256()
                info = tarfile.TarInfo(path)
                info.size, info.mode, info.mtime = size, 0o644, int(member.mtime)
                writer.addfile(info, _Hashed(data, digest))
                kept.append((path, size, digest.hexdigest(), 0))
                seen.add(path)
                good = out.tell()
                total += size
    except Exception:  # noqa: BLE001 - a broken tar (rules, format, cut short): keep what passed
        truncated = True
    # End the tar after the last whole member (a member cut short is dropped).
    out.seek(good if kept else start)
    out.truncate()
    out.write(bytes(1024))
    offsets = {}
    out.seek(start)
    with tarfile.open(fileobj=out, mode="r:") as written:
        for member in written:
            offsets[member.name] = member.offset_data - start
    return [(p, n, h, offsets[p]) for p, n, h, _ in kept], truncated or not complete


class _Hashed:
    """A member's data as ``addfile`` reads it, hashed on the way."""

    def __init__(self, raw: "IO[bytes]", digest: "Any") -> None:
        self._raw = raw
        self._digest = digest

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._digest.update(data)
        return data
