"""Tiny wheels made on the spot, so dependency tests never reach a package index.

A wheel is a zip archive with the package and a ``.dist-info`` directory (``METADATA``,
``WHEEL``, ``RECORD``); ``make_wheel`` writes one pip installs like any other
(pure Python, ``py3-none-any``).
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

__all__ = ["make_wheel"]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str] | None = None) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` into ``folder``: the module ``name``
    (``VERSION`` set to ``version``) plus ``files`` (path in the wheel -> text)."""
    dist_info = f"{name}-{version}.dist-info"
    members = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        **(files or {}),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: pyexec-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = [
        f"{path},{_record_hash(text.encode())},{len(text.encode())}"
        for path, text in members.items()
    ]
    record.append(f"{dist_info}/RECORD,,")
    members[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, text in members.items():
            archive.writestr(member, text)
    return path
