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

import attrs

from .cachedir import NotCacheable, key_digest, normalise_requirements, wheel_platforms

__all__ = [
    "EnvKey",
    "Installer",
    "NotCacheable",
    "Target",
    "normalise_requirements",
    "platform_tags",
]


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
    return tuple(wheel_platforms(target.machine, target.libc, target.libc_version))


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
