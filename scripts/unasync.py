#!/usr/bin/env python3
"""Generate the blocking client (``pyexec/client/_sync.py``) from the asyncio one.

The two differ only in I/O, so ``_async.py`` is the source and ``_sync.py`` is
written from it by the textual substitutions below (the approach of httpcore's
``unasync.py``). ``--check`` exits 1 when the committed file differs from what
would be generated; ``tests/test_client_twins.py`` runs that check, so the twins
cannot drift. Edit ``_async.py``, then run ``python scripts/unasync.py``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "pyexec" / "client" / "_async.py"
TARGET = ROOT / "pyexec" / "client" / "_sync.py"

HEADER = "# Generated from _async.py by scripts/unasync.py: edit that file, then run the script.\n"

#: (pattern, replacement), applied in order to the whole source.
SUBSTITUTIONS: list[tuple[str, str]] = [
    (r"The asyncio client", "The blocking client"),
    (r"^import asyncio$", "import time"),
    (r"\basyncio\.sleep\b", "time.sleep"),
    (r"\bAsyncBaseTransport\b", "BaseTransport"),
    (r"\bAsyncClient\b", "Client"),
    (r"\b__aenter__\b", "__enter__"),
    (r"\b__aexit__\b", "__exit__"),
    (r"\baclose\(\)", "close()"),
    (r"\bdef aclose\b", "def close"),
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\basync for\b", "for"),
    (r"\basync with\b", "with"),
    (r"\baread\(\)", "read()"),
    (r"\baiter_lines\(\)", "iter_lines()"),
    (r"\baiter_bytes\(\)", "iter_bytes()"),
    (r"\basync def\b", "def"),
    (r"\bawait ", ""),
]


def generate(source: str) -> str:
    """The blocking twin of the asyncio client's source."""
    for pattern, replacement in SUBSTITUTIONS:
        source = re.sub(pattern, replacement, source, flags=re.MULTILINE)
    for word in ("async ", "await ", "asyncio", "Async"):
        if word in source:
            raise ValueError(f"{word.strip()!r} is left after the substitutions: add a rule")
    return HEADER + source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = generate(SOURCE.read_text(encoding="utf-8"))
    if args.check:
        if TARGET.read_text(encoding="utf-8") != text:
            sys.stderr.write(f"{TARGET} is out of date: run python scripts/unasync.py\n")
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
