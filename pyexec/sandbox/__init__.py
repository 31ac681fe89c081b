"""Code that runs inside sandbox containers, shipped as package data, and its host side.

``wire`` is what a runner speaks to the bootstrap (spec, archive frames, control line).

``bootstrap_source()`` is what a runner passes to ``python3 -I -S -c``: the
bootstrap (``bootstrap.py``), the tar rules (``tarcheck.py``) and a call to
``main()``; built-in modules only, so any image with Python 3.8+ runs them
unchanged and fast.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["bootstrap_source"]

# bootstrap.py first: its ``from __future__ import annotations`` must open the source.
_PARTS = ("bootstrap.py", "tarcheck.py")


@cache
def bootstrap_source() -> str:
    here = resources.files(__name__)
    parts = [here.joinpath(name).read_text(encoding="utf-8") for name in _PARTS]
    return "\n\n".join([*parts, "main()\n"])
