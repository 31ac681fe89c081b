"""The dependency cache on Nomad: a host volume per node, as parts of the runner jobs.

The ``-pip`` runner jobs (``pyexec.runner.nomad_job``) claim the host volume named by
``PYEXEC_NOMAD_DEPS_VOLUME``: read-write in the trusted ``install`` task, which applies
``cachedir``'s rules on its node (``pyexec/taskscripts/nomad_install.py``, with
``cachedir.py`` and ``build_env.py`` shipped beside it), read-only in the ``run`` task
(the request's image), which puts the environment the installer handed over on its
path and holds its use lock (``pyexec/taskscripts/nomad_run.py``). Pure functions of
``Settings``: the job spec stays data. See docs/deps-cache.md.
"""

from __future__ import annotations

from typing import Any

from pyexec.settings import Settings

__all__ = [
    "MOUNT",
    "PREWARM_ENV",
    "PREWARM_SUFFIX",
    "VOLUME",
    "enabled",
    "installer_env",
    "mounts",
    "volumes",
]

#: The task group's name for the volume, and where the tasks see it.
VOLUME = "pyexec-deps"
MOUNT = "/pyexec-deps"
#: What the installer runs with its script (``TASK_FILES`` destinations).
INSTALLER_CODE = ("local/pyexec/cachedir.py", "local/pyexec/build_env.py")
#: The prewarm job (``<PYEXEC_NOMAD_JOB_PREFIX>-deps-prewarm``): the sets it builds, as
#: JSON in this variable of its installer task, and the least memory it gets (MiB).
PREWARM_SUFFIX = "-deps-prewarm"
PREWARM_ENV = "PYEXEC_DEPS_PREWARM_SETS"
PREWARM_MEMORY_MB = 512


def enabled(settings: Settings) -> bool:
    """Whether the ``-pip`` jobs use the nodes' dependency cache."""
    return bool(settings.nomad_deps_volume) and settings.deps_cache_bytes > 0


def volumes(settings: Settings) -> dict[str, Any]:
    """The task group's ``Volumes``: the node's host volume (only nodes with it qualify)."""
    return {
        VOLUME: {
            "Name": VOLUME,
            "Type": "host",
            "Source": settings.nomad_deps_volume,
            "ReadOnly": False,
        }
    }


def mounts(*, writable: bool) -> list[dict[str, Any]]:
    """A task's ``VolumeMounts``: read-write for the trusted installer only."""
    return [{"Volume": VOLUME, "Destination": MOUNT, "ReadOnly": not writable}]


def installer_env(settings: Settings) -> dict[str, str]:
    """What the installer needs to build into the cache and compute the key."""
    return {
        "PYEXEC_DEPS_DIR": MOUNT,
        "PYEXEC_DEPS_CACHE_BYTES": str(settings.deps_cache_bytes),
        "PYEXEC_DEPS_INDEX_URL": settings.deps_index_url or "",
        "PYEXEC_DEPS_BUILDER_IMAGE": settings.nomad_trusted_image or settings.default_image,
        "PYEXEC_DEPS_BUILD_TIMEOUT": str(settings.deps_build_timeout),
    }
