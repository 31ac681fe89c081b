"""Code that runs inside sandbox containers, shipped as package data, and its host side.

``wire`` is what a runner speaks to the bootstrap (spec, archive frames, control line).

``bootstrap_source()`` is what a runner passes to ``python3 -I -S -c``: the
bootstrap (``bootstrap.py``), the tar rules (``tarcheck.py``), the artifact collector
(``collect.py``) and a call to ``main()``; standard library only, so any image with
Python 3.8+ runs them unchanged and fast.

``bootstrap_command(preload)`` is a sandbox container's command: with ``preload``
(a cached environment's path in the sandbox and the modules to import from it), the
bootstrap starts the program's interpreter at once and imports them while it waits
for the spec (``preload.py``, passed as an argument: it runs in the program's own
interpreter, not the bootstrap's).

``seccomp_profile()`` is the system-call allow-list every sandbox container runs
under (``seccomp.json``: Docker's ``security_opt`` format, used by the local runner
and the Nomad runner jobs alike). It replaces the engine's default profile and
denies on top of it what a sandboxed program never needs: ``ptrace``,
``process_vm_readv``/``writev``, ``personality``, ``io_uring``, ``bpf``, namespaces.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import attrs

__all__ = ["Preload", "bootstrap_command", "bootstrap_source", "preload_source", "seccomp_profile"]

# bootstrap.py first: its ``from __future__ import annotations`` must open the source.
_PARTS = ("bootstrap.py", "tarcheck.py", "collect.py")


@cache
def bootstrap_source() -> str:
    here = resources.files(__name__)
    parts = [here.joinpath(name).read_text(encoding="utf-8") for name in _PARTS]
    return "\n\n".join([*parts, "main()\n"])


@cache
def preload_source() -> str:
    return resources.files(__name__).joinpath("preload.py").read_text(encoding="utf-8")


@attrs.frozen
class Preload:
    """What a sandbox imports before its program arrives: ``modules`` of the cached
    environment at ``deps`` (its path in the sandbox, as the spec's ``deps`` says it)."""

    deps: str
    modules: tuple[str, ...]


def bootstrap_command(preload: Preload | None = None) -> list[str]:
    command = ["python3", "-I", "-S", "-c", bootstrap_source()]
    if preload is not None and preload.modules:
        command += ["preload", preload.deps, ",".join(preload.modules), preload_source()]
    return command


@cache
def seccomp_profile() -> str:
    """The sandbox's seccomp profile as compact JSON text (``seccomp=<this>`` in
    ``security_opt``; the engine takes the profile itself, not a path)."""
    text = resources.files(__name__).joinpath("seccomp.json").read_text(encoding="utf-8")
    return json.dumps(json.loads(text), separators=(",", ":"))
