"""The trusted builder of one dependency environment (runs in the builder image).

Shipped as ``python3 -I -c <this file + cachedir.py + "main()">`` (see
``pyexec.deps.builder_source``) into the operator's trusted image, never the
request's. It reads its job as JSON from ``PYEXEC_DEPS_JOB``: the requirements,
the target (Python version, platform tags), the installer's options, the build
directory. It installs wheels only (``--only-binary``: no package build script
runs) into ``<build>/site`` and writes the marker last (``write_marker``), so a
build stopped anywhere before that has no marker and is never used. pip compiles the
bytecode too: runs mount the environment read-only, so a module without it would be
compiled again by every run (it only helps a target whose Python is the builder's).
Exits with pip's exit code; pip's output is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # Inside the container cachedir.py's source follows this file's.
    from .cachedir import SITE, write_marker


def pip_argv(job: dict[str, Any]) -> list[str]:
    """The pip command line of ``job`` (a pure function: the builder's whole policy)."""
    argv = [
        sys.executable, "-m", "pip", "install", "--no-input", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "off",
        "--only-binary", job["only_binary"], "--python-version", job["python"],
        "--implementation", "cp", "--target", os.path.join(job["build"], SITE),
    ]  # fmt: skip
    for tag in job["platforms"]:
        argv += ["--platform", tag]
    if job.get("index_url"):
        argv += ["--index-url", job["index_url"]]
    else:
        argv.append("--no-index")
    if job.get("find_links"):
        argv += ["--find-links", job["find_links"]]
    return [*argv, *job["requirements"]]


def main() -> None:
    job = json.loads(os.environ["PYEXEC_DEPS_JOB"])
    env = dict(os.environ, HOME="/tmp", PYTHONNOUSERSITE="1")
    code = subprocess.call(pip_argv(job), env=env, stdin=subprocess.DEVNULL)
    if code != 0:
        sys.exit(code)
    write_marker(job["build"], job["key"], job["describe"])
