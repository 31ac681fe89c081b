"""The uncompressed tar eval hands to the execution service: the user's files plus the wrapper."""

from __future__ import annotations

import functools
import importlib.resources
import io
import tarfile
from collections.abc import Iterable, Mapping
from typing import Any

from .request import RESERVED_DIR

__all__ = ["WRAPPER_PATH", "build_archive", "wrapper_source"]

#: The wrapper's place in the archive; it is the entrypoint the runner starts.
WRAPPER_PATH = f"{RESERVED_DIR}/eval.py"


@functools.cache
def _sandbox_text() -> str:
    return importlib.resources.files(__package__).joinpath("wrapper.py").read_text("utf-8")


def wrapper_source(config: Mapping[str, Any]) -> str:
    """The wrapper program for one run: ``wrapper.py`` with its ``main`` call.

    ``config`` holds only str/bool/int values, whose ``repr`` is a Python literal.
    """
    return f"{_sandbox_text()}\n\nmain({dict(config)!r})\n"


def build_archive(files: Iterable[tuple[str, str]], wrapper: str) -> io.BytesIO:
    """A tar of ``files`` (name, text) and the wrapper, with directory entries, at offset 0."""
    buffer = io.BytesIO()
    members = [*files, (WRAPPER_PATH, wrapper)]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in _directories(name for name, _ in members):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, text in members:
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _directories(names: Iterable[str]) -> list[str]:
    found = set()
    for name in names:
        parts = name.split("/")[:-1]
        for size in range(1, len(parts) + 1):
            found.add("/".join(parts[:size]))
    return sorted(found)
