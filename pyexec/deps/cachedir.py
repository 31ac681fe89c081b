"""The rules of a dependency cache directory, once, for every backend.

Standard library only: the service uses it on the local Docker host, and the Nomad
``install`` task runs this same file on each node (shipped as a template). Layout::

    <root>/envs/<key>/site/             a finished environment (what runs mount, read-only)
    <root>/envs/<key>/pyexec-env.json   its marker: the key, the SHA-256 of the tree, the size
    <root>/builds/<key>.<nonce>/        a build in progress (never mounted)
    <root>/locks/<key>.build            flock: one builder per key (any process on the host)
    <root>/locks/<key>.use              flock, shared by every run using the environment;
                                        its mtime is the last use (least-recently-used order)
    <root>/trash/                       environments being removed

Also here: which requirements a cache takes and how they are spelled
(``normalise_requirements``), the wheel platforms of a target, the key's digest.

Rules:

- A build writes into its own ``builds/`` directory and writes the marker *last*,
  with the digest of everything it installed. ``publish`` recomputes that digest and
  only then renames the directory into ``envs/`` (an atomic rename): a build that was
  killed, failed or left a tree that does not match its marker is never in ``envs/``,
  so nothing ever mounts it, and the next builder of the key removes it.
- Only the holder of a key's build lock builds it; whoever waits for the lock finds
  the environment ready when it gets it.
- A run holds a shared lock on the key's use file for as long as it runs. Eviction
  (least recently used first, until the cache fits its cap) takes that lock
  exclusively without waiting: an environment in use is skipped, never removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

ENVS = "envs"
BUILDS = "builds"
LOCKS = "locks"
TRASH = "trash"
SITE = "site"
MARKER = "pyexec-env.json"
MARKER_VERSION = 1


_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_LINE = re.compile(
    rf"^(?P<name>{_NAME})\s*(?:\[(?P<extras>[^\]]*)\])?\s*(?P<spec>(?:~=|===|==|!=|<=|>=|<|>).*)?$"
)
_SPEC = re.compile(r"^(~=|===|==|!=|<=|>=|<|>)\s*([A-Za-z0-9.*+!_-]+)$")
#: The oldest glibc minor ``manylinux_2_<minor>`` tags are generated down to (manylinux1).
_OLDEST_GLIBC_MINOR = 5


class NotCacheable(ValueError):
    """A requirements text the cache does not take (the message says which line, why)."""


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def normalise_requirements(text: str) -> tuple[str, ...]:
    """The requirement lines of ``text`` in one spelling each, sorted, duplicates merged.

    Comments and blank lines are dropped; names are PEP 503-normalised, extras sorted,
    specifiers sorted and without spaces. Raises ``NotCacheable`` for anything else.
    """
    found: set[str] = set()
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise NotCacheable(f"{line!r}: pip options are not cacheable")
        if ";" in line:
            raise NotCacheable(f"{line!r}: environment markers are not cacheable")
        if "@" in line or "://" in line or line.startswith((".", "/", "file:")):
            raise NotCacheable(f"{line!r}: URLs and paths are not cacheable")
        match = _LINE.match(line)
        if match is None:
            raise NotCacheable(f"{line!r}: not a requirement (name[extras] specifiers)")
        extras = sorted(
            {canonical_name(e.strip()) for e in (match["extras"] or "").split(",") if e.strip()}
        )
        specs = []
        for part in (match["spec"] or "").split(","):
            if not part.strip():
                continue
            spec = _SPEC.match(part.strip())
            if spec is None:
                raise NotCacheable(f"{line!r}: cannot read the version specifier {part.strip()!r}")
            specs.append(spec[1] + spec[2])
        normal = canonical_name(match["name"])
        if extras:
            normal += "[" + ",".join(extras) + "]"
        found.add(normal + ",".join(sorted(set(specs))))
    return tuple(sorted(found))


def wheel_platforms(machine: str, libc: str, libc_version: str) -> list[str]:
    """Wheel platform tags an interpreter on ``machine`` with this C library loads, newest
    first: never a wheel that needs a newer libc than the target has."""
    major, _, minor = libc_version.partition(".")
    newest = int(minor) if minor.isdigit() else 0
    if libc == "musl":
        return [f"musllinux_{major}_{m}_{machine}" for m in range(newest, -1, -1)]
    tags = [f"manylinux_2_{m}_{machine}" for m in range(newest, _OLDEST_GLIBC_MINOR - 1, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{machine}" for m, name in legacy.items() if newest >= m]


def key_digest(describe: dict[str, Any]) -> str:
    """The name of the environment ``describe`` says (32 hex chars of the SHA-256 of its
    canonical JSON): ``pyexec.deps.key.EnvKey.digest`` and the Nomad installer alike."""
    body = json.dumps(describe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def tree_digest(root: str) -> tuple[str, int, int]:
    """(SHA-256 hex, bytes, files) of the tree under ``root``: every path, kind, the
    executable bit, file contents and link targets, in a fixed order."""
    digest = hashlib.sha256()
    total = files = 0
    for here, dirs, names in os.walk(root):
        dirs.sort()
        rel_here = os.path.relpath(here, root)
        for name in sorted(names + [d for d in dirs if os.path.islink(os.path.join(here, d))]):
            path = os.path.join(here, name)
            rel = os.path.normpath(os.path.join(rel_here, name))
            info = os.lstat(path)
            if os.path.islink(path):
                digest.update(f"l {rel} {os.readlink(path)}\n".encode("utf-8", "surrogateescape"))
                continue
            if not os.path.isfile(path):
                continue
            content = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    content.update(chunk)
            executable = "x" if info.st_mode & 0o111 else "-"
            line = f"f {rel} {executable} {content.hexdigest()}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
            total += info.st_size
            files += 1
        for name in dirs:
            rel = os.path.normpath(os.path.join(rel_here, name))
            digest.update(f"d {rel}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest(), total, files


def write_marker(build: str, key: str, describe: dict[str, Any]) -> dict[str, Any]:
    """Write the marker of a finished build (last: nothing is written after it)."""
    sha, size, files = tree_digest(os.path.join(build, SITE))
    marker = {
        "version": MARKER_VERSION,
        "key": key,
        "describe": describe,
        "sha256": sha,
        "bytes": size,
        "files": files,
        "built_at": time.time(),
    }
    tmp = os.path.join(build, MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(marker, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(build, MARKER))
    return marker


def read_marker(env: str, key: str) -> dict[str, Any] | None:
    """The marker of ``env`` if it is one of ``key`` (``None``: none, or not this key's)."""
    try:
        with open(os.path.join(env, MARKER), encoding="utf-8") as fh:
            marker = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("key") != key:
        return None
    if marker.get("version") != MARKER_VERSION or not isinstance(marker.get("bytes"), int):
        return None
    return marker


def verify(env: str, key: str) -> dict[str, Any] | None:
    """The marker of ``env`` if its tree is exactly what the marker says was installed."""
    marker = read_marker(env, key)
    if marker is None or not os.path.isdir(os.path.join(env, SITE)):
        return None
    sha, size, files = tree_digest(os.path.join(env, SITE))
    if (sha, size, files) != (marker["sha256"], marker["bytes"], marker.get("files")):
        return None
    return marker


class Entry:
    """One finished environment, as listed."""

    def __init__(self, key: str, marker: dict[str, Any], last_used: float, in_use: bool) -> None:
        self.key = key
        self.marker = marker
        self.last_used = last_used
        self.in_use = in_use

    @property
    def size(self) -> int:
        return int(self.marker["bytes"])

    @property
    def requirements(self) -> list[str]:
        return list((self.marker.get("describe") or {}).get("requirements") or [])


class CacheDir:
    """A cache directory on this host (see the module docstring for its rules)."""

    def __init__(self, root: str) -> None:
        self.root = root

    # --- paths ------------------------------------------------------------------------

    def env(self, key: str) -> str:
        return os.path.join(self.root, ENVS, key)

    def site(self, key: str) -> str:
        return os.path.join(self.env(key), SITE)

    def _lock_path(self, key: str, kind: str) -> str:
        return os.path.join(self.root, LOCKS, f"{key}.{kind}")

    def prepare(self) -> None:
        for part in (ENVS, BUILDS, LOCKS, TRASH):
            os.makedirs(os.path.join(self.root, part), exist_ok=True)

    # --- finished environments -----------------------------------------------------------

    def ready(self, key: str) -> dict[str, Any] | None:
        """The marker of the finished environment of ``key``, if there is one.

        Only ``publish`` puts anything into ``envs/``, after checking the whole tree
        against the marker, so the marker alone says the environment is complete."""
        return read_marker(self.env(key), key)

    # --- building ------------------------------------------------------------------------

    def try_build_lock(self, key: str) -> int | None:
        """The build lock of ``key`` (a file descriptor to ``unlock``), or ``None`` if
        another builder holds it. Whoever gets it removes the key's leftover builds."""
        fd = self._lock(key, "build", fcntl.LOCK_EX)
        if fd is not None:
            for name in os.listdir(os.path.join(self.root, BUILDS)):
                if name.startswith(key + "."):
                    shutil.rmtree(os.path.join(self.root, BUILDS, name), ignore_errors=True)
        return fd

    def new_build(self, key: str) -> str:
        """A fresh, empty build directory for ``key`` (hold its build lock)."""
        path = os.path.join(self.root, BUILDS, f"{key}.{os.getpid()}.{os.urandom(4).hex()}")
        os.makedirs(os.path.join(path, SITE))
        return path

    def publish(self, build: str, key: str) -> dict[str, Any] | None:
        """Move a verified build into place; ``None`` (and the build removed) if the
        tree does not match a marker of ``key`` (unfinished, failed, tampered with)."""
        marker = verify(build, key)
        if marker is None:
            shutil.rmtree(build, ignore_errors=True)
            return None
        target = self.env(key)
        if os.path.isdir(target):  # left by a crash after its marker was checked: replace
            self._discard(target)
        os.rename(build, target)
        os.utime(self._touch(key))
        return marker

    # --- using ---------------------------------------------------------------------------

    def try_use(self, key: str) -> int | None:
        """A shared use lock of ``key`` (``unlock`` it when the run is over), or ``None``
        while an eviction holds it; marks the environment as just used."""
        fd = self._lock(key, "use", fcntl.LOCK_SH)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.utime(self._lock_path(key, "use"))
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor drops its flock

    # --- listing and removing ---------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every finished environment, least recently used first."""
        found = []
        try:
            keys = os.listdir(os.path.join(self.root, ENVS))
        except FileNotFoundError:
            return []
        for key in keys:
            marker = self.ready(key)
            if marker is None:
                continue
            try:
                last_used = os.stat(self._lock_path(key, "use")).st_mtime
            except OSError:
                last_used = float(marker.get("built_at") or 0)
            found.append(Entry(key, marker, last_used, self.in_use(key)))
        return sorted(found, key=lambda e: (e.last_used, e.key))

    def in_use(self, key: str) -> bool:
        fd = self._lock(key, "use", fcntl.LOCK_EX)
        if fd is None:
            return True
        self.unlock(fd)
        return False

    def used_bytes(self) -> int:
        return sum(entry.size for entry in self.entries())

    def remove(self, key: str) -> bool:
        """Remove the environment of ``key`` unless a run uses it; ``True`` if removed."""
        fd = self._lock(key, "use", fcntl.LOCK_EX)
        if fd is None:
            return False
        try:
            if not os.path.isdir(self.env(key)):
                return False
            self._discard(self.env(key))
            return True
        finally:
            self.unlock(fd)

    def evict(self, cap: int, grace: float = 0.0) -> list[str]:
        """Remove least recently used environments not in use until the cache holds at
        most ``cap`` bytes (or only environments in use are left); the keys removed.

        ``grace``: also keep what was handed out within that many seconds (the Nomad
        installer hands an environment to a run task that takes its use lock later)."""
        entries = self.entries()
        total = sum(entry.size for entry in entries)
        removed = []
        recent = time.time() - grace
        for entry in entries:
            if total <= cap:
                break
            if grace and entry.last_used >= recent:
                continue
            if self.remove(entry.key):
                total -= entry.size
                removed.append(entry.key)
        return removed

    def sweep(self) -> None:
        """Remove builds nobody is building (a killed builder's) and the trash."""
        for name in os.listdir(os.path.join(self.root, BUILDS)):
            key = name.split(".", 1)[0]
            fd = self._lock(key, "build", fcntl.LOCK_EX)
            if fd is not None:
                shutil.rmtree(os.path.join(self.root, BUILDS, name), ignore_errors=True)
                self.unlock(fd)
        for name in os.listdir(os.path.join(self.root, TRASH)):
            shutil.rmtree(os.path.join(self.root, TRASH, name), ignore_errors=True)

    # --- helpers ---------------------------------------------------------------------------

    def _touch(self, key: str) -> str:
        path = self._lock_path(key, "use")
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
        return path

    def _lock(self, key: str, kind: str, mode: int) -> int | None:
        fd = os.open(self._lock_path(key, kind), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None
            raise
        return fd

    def _discard(self, path: str) -> None:
        """Rename out of the way at once (atomic), then delete."""
        trash = os.path.join(self.root, TRASH, f"{os.path.basename(path)}.{os.urandom(4).hex()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def entries_json(cache: CacheDir) -> Iterator[dict[str, Any]]:
    """``CacheDir.entries`` as JSON data (for ``pyexec cache ls --json``)."""
    for entry in cache.entries():
        yield {
            "key": entry.key,
            "bytes": entry.size,
            "last_used": entry.last_used,
            "in_use": entry.in_use,
            "requirements": entry.requirements,
            "target": (entry.marker.get("describe") or {}).get("target"),
        }
