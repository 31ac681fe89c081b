"""Building tars in memory for tests."""

from __future__ import annotations

import io
import tarfile


def make_tar(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def symlink_tar() -> bytes:
    """``pkg/mod.py`` plus ``lib -> pkg`` (an in-tree symlink) and a main importing through it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, text in {
            "main.py": "import sys\nsys.path.insert(0, 'lib')\nimport mod\nprint(mod.VALUE)\n",
            "pkg/mod.py": "VALUE = 'through the link'\n",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("lib")
        link.type = tarfile.SYMTYPE
        link.linkname = "pkg"
        tar.addfile(link)
    return buf.getvalue()
