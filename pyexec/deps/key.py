"""What identifies a dependency environment: normalised requirements, target, installer.

A cache key is the SHA-256 of the normalised requirement lines, the target Python
version and platform, and what the installer is told (index, find-links, builder
image, wheels-only). Two requests share an environment exactly when all of them are
equal: ``numpy==1.26.4`` and ``numpy==2.1.0`` are two keys, ``NumPy`` and ``numpy``
one. Only plain requirements take part (``name[extras] <specifiers>``): a URL, a local
path, an environment marker or a pip option is not cacheable (``NotCacheable``), since
the trusted builder would fetch what the requester names or evaluate a marker against
its own interpreter instead of the target's.
"""

from __future__ import annotations

import re

import attrs

from .cachedir import key_digest

__all__ = [
    "EnvKey",
    "Installer",
    "NotCacheable",
    "Target",
    "normalise_requirements",
    "platform_tags",
]

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_LINE = re.compile(
    rf"^(?P<name>{_NAME})\s*(?:\[(?P<extras>[^\]]*)\])?\s*(?P<spec>(?:~=|===|==|!=|<=|>=|<|>).*)?$"
)
_SPEC = re.compile(r"^(~=|===|==|!=|<=|>=|<|>)\s*([A-Za-z0-9.*+!_-]+)$")
#: The oldest glibc minor ``manylinux_2_<minor>`` tags are generated down to (manylinux1).
_OLDEST_GLIBC_MINOR = 5


class NotCacheable(ValueError):
    """A requirements text the cache does not take (the message says which line, why)."""


def _canonical(name: str) -> str:
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
            {_canonical(e.strip()) for e in (match["extras"] or "").split(",") if e.strip()}
        )
        specs = []
        for part in (match["spec"] or "").split(","):
            if not part.strip():
                continue
            spec = _SPEC.match(part.strip())
            if spec is None:
                raise NotCacheable(f"{line!r}: cannot read the version specifier {part.strip()!r}")
            specs.append(spec[1] + spec[2])
        normal = _canonical(match["name"])
        if extras:
            normal += "[" + ",".join(extras) + "]"
        found.add(normal + ",".join(sorted(set(specs))))
    return tuple(sorted(found))


@attrs.frozen
class Target:
    """The interpreter an environment is built for, as a run image reports it."""

    #: ``major.minor``.
    python: str
    #: ``uname -m`` of the image: ``x86_64``, ``aarch64``.
    machine: str
    #: ``glibc`` or ``musl``.
    libc: str
    #: ``major.minor`` of the C library.
    libc_version: str

    def label(self) -> str:
        return f"cp{self.python.replace('.', '')}-{self.machine}-{self.libc}{self.libc_version}"


def platform_tags(target: Target) -> tuple[str, ...]:
    """The wheel platform tags a run image of ``target`` can load, newest first (what the
    builder hands pip as ``--platform``, so a wheel never needs a newer libc than the run's)."""
    major, _, minor = target.libc_version.partition(".")
    newest = int(minor) if minor.isdigit() else 0
    arch = target.machine
    if target.libc == "musl":
        return tuple(f"musllinux_{major}_{m}_{arch}" for m in range(newest, -1, -1))
    tags = [f"manylinux_2_{m}_{arch}" for m in range(newest, _OLDEST_GLIBC_MINOR - 1, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for m, name in legacy.items() if newest >= m]
    return tuple(tags)


@attrs.frozen
class Installer:
    """What the trusted builder is told besides the requirements (part of the key)."""

    image: str
    index_url: str | None
    find_links: str | None
    only_binary: str = ":all:"


@attrs.frozen
class EnvKey:
    """One dependency environment: what is installed, for which interpreter, by whom."""

    requirements: tuple[str, ...]
    target: Target
    installer: Installer

    @property
    def digest(self) -> str:
        """The key's name in the cache (hex SHA-256 of its canonical JSON, 32 chars)."""
        return key_digest(self.describe())

    def describe(self) -> dict[str, object]:
        """The key as JSON data (stored in the environment's marker)."""
        return {
            "requirements": list(self.requirements),
            "target": attrs.asdict(self.target),
            "installer": attrs.asdict(self.installer),
        }
