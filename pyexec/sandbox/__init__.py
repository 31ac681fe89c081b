"""Code that runs inside sandbox containers, shipped as package data.

``bootstrap_source()`` is what a runner passes to ``python3 -I -S -c``: the tar
rules (``tarcheck.py``) followed by the bootstrap (``bootstrap.py``), both standard
library only, so any image with Python 3.8+ can run them unchanged.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["bootstrap_source"]


@cache
def bootstrap_source() -> str:
    here = resources.files(__name__)
    parts = (
        here.joinpath(name).read_text(encoding="utf-8") for name in ("tarcheck.py", "bootstrap.py")
    )
    return "\n\n".join(parts)
