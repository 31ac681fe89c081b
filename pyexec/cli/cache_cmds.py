"""``pyexec cache ls`` and ``pyexec cache prune``: the dependency cache of this host.

They read the cache directory itself (``PYEXEC_DEPS_CACHE_DIR``; on a Nomad node, the
host volume's path), not a pyexec server, and follow its rules (``pyexec.deps.cachedir``):
an environment a run uses is never removed. Exit codes as in docs/cli.md: 0 done,
2 a bad setting or argument, 125 the directory cannot be read or changed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Annotated

from cyclopts import App, Parameter

from pyexec.deps.cachedir import CacheDir, Entry, entries_json
from pyexec.errors import PyexecError
from pyexec.settings import Settings

from . import exitcodes

__all__ = ["cache_app"]

cache_app = App(name="cache", help="The dependency cache of this host (see docs/deps-cache.md).")


def _cache() -> CacheDir | int:
    try:
        settings = Settings.from_env(os.environ)
    except PyexecError as exc:
        sys.stderr.write(f"pyexec: {exc.message}\n")
        return exitcodes.USAGE
    root = settings.deps_cache_dir
    if not os.path.isdir(root):
        sys.stderr.write(f"pyexec: no dependency cache at {root} (PYEXEC_DEPS_CACHE_DIR)\n")
        return exitcodes.USAGE
    return CacheDir(root)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _line(entry: Entry) -> str:
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
    target = (entry.marker.get("describe") or {}).get("target") or {}
    python = target.get("python", "?")
    flag = "in use" if entry.in_use else ""
    requirements = " ".join(entry.requirements)
    return f"{entry.key}  {_size(entry.size):>10}  {used}  py{python:<5} {flag:6}  {requirements}"


@cache_app.command
def ls(
    *,
    as_json: Annotated[bool, Parameter(name="--json", negative="", help="One JSON list.")] = False,
) -> int:
    """List the finished environments, least recently used first, and their total size."""
    cache = _cache()
    if isinstance(cache, int):
        return cache
    try:
        if as_json:
            sys.stdout.write(json.dumps(list(entries_json(cache)), indent=2) + "\n")
            return 0
        entries = cache.entries()
    except OSError as exc:
        sys.stderr.write(f"pyexec: cannot read the dependency cache: {exc}\n")
        return exitcodes.PYEXEC_ERROR
    for entry in entries:
        sys.stdout.write(_line(entry) + "\n")
    total = sum(entry.size for entry in entries)
    sys.stdout.write(f"{len(entries)} environments, {_size(total)}\n")
    return 0


@cache_app.command
def prune(
    *,
    all_: Annotated[
        bool, Parameter(name="--all", negative="", help="Every environment not in use.")
    ] = False,
    key: Annotated[
        list[str] | None, Parameter(name="--key", help="This environment (repeatable).")
    ] = None,
    max_bytes: Annotated[
        int | None,
        Parameter(
            name="--max-bytes", help="Evict down to this size (default PYEXEC_DEPS_CACHE_BYTES)."
        ),
    ] = None,
) -> int:
    """Remove environments (least recently used first, down to the cap, by default) and
    leftovers of killed builds; an environment in use is kept and named on stderr."""
    cache = _cache()
    if isinstance(cache, int):
        return cache
    if sum((all_, bool(key), max_bytes is not None)) > 1:
        sys.stderr.write("pyexec: give one of --all, --key, --max-bytes\n")
        return exitcodes.USAGE
    try:
        cache.sweep()
        if key:
            known = {entry.key: entry for entry in cache.entries()}
            unknown = [k for k in key if k not in known]
            if unknown:
                sys.stderr.write(f"pyexec: no environment {', '.join(unknown)}\n")
                return exitcodes.USAGE
            removed = [k for k in key if cache.remove(k)]
        elif all_:
            removed = [entry.key for entry in cache.entries() if cache.remove(entry.key)]
        else:
            cap = (
                max_bytes
                if max_bytes is not None
                else Settings.from_env(os.environ).deps_cache_bytes
            )
            removed = cache.evict(max(cap, 0))
        kept = [entry.key for entry in cache.entries() if entry.in_use]
    except OSError as exc:
        sys.stderr.write(f"pyexec: cannot change the dependency cache: {exc}\n")
        return exitcodes.PYEXEC_ERROR
    for name in removed:
        sys.stdout.write(f"removed {name}\n")
    for name in kept:
        if all_ or (key and name in key):
            sys.stderr.write(f"pyexec: {name} is in use, kept\n")
    return 0
