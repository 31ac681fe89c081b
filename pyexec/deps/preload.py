"""Which modules of a finished environment a warm sandbox imports before its run.

A sandbox kept for a prewarmed set (``PYEXEC_DEPS_POOL_SIZE``) starts the program's
interpreter ahead of the request and imports the set's modules in it
(``pyexec.sandbox.preload``). Per requested distribution that is its top-level module
named like it (``numpy``, ``pandas``; ``scikit-learn`` has ``sklearn`` only, its one
public top-level name), read from the ``RECORD`` of its installed ``.dist-info``:
never a module nobody asked for, and none for a distribution whose top-level names
are ambiguous. What it imports, it imports as the program would.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable

from .cachedir import canonical_name

__all__ = ["preload_modules"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIST_INFO = ".dist-info"


def _top_level(record: str) -> set[str]:
    """The public top-level module names a distribution's ``RECORD`` installs."""
    names: set[str] = set()
    with open(record, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            head = row[0].replace("\\", "/").split("/", 1)
            first = head[0]
            if len(head) == 1:  # a module file, or a file at the top level
                if not first.endswith(".py"):
                    continue
                first = first[:-3]
            if first.isidentifier() and not first.startswith("_"):
                names.add(first)
    return names


def preload_modules(site: str, requirements: Iterable[str]) -> tuple[str, ...]:
    """The modules to import ahead of a run of the environment at ``site`` (its
    ``requirements`` as ``normalise_requirements`` spells them), sorted."""
    wanted = set()
    for line in requirements:
        match = _NAME.match(line)
        if match:
            wanted.add(canonical_name(match[0]))
    chosen: set[str] = set()
    try:
        entries = os.listdir(site)
    except OSError:
        return ()
    for entry in entries:
        if not entry.endswith(_DIST_INFO):
            continue
        dist = canonical_name(entry[: -len(_DIST_INFO)].rsplit("-", 1)[0])
        if dist not in wanted:
            continue
        try:
            names = _top_level(os.path.join(site, entry, "RECORD"))
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        own = dist.replace("-", "_")
        if own in names:
            chosen.add(own)
        elif len(names) == 1:
            chosen |= names
    return tuple(sorted(chosen))
