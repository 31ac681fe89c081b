"""The ``install`` task of pyexec's Nomad runner job: requirements, by trusted code only.

Runs as prestart of the ``-pip`` runner jobs in the operator's trusted image
(``PYEXEC_NOMAD_TRUSTED_IMAGE``), never the request's, with the network: this file is
shipped as a template and run with ``python3 -I``. It reads the request from the record
the Nomad client rendered into ``/local/record.json`` and installs its requirements as
wheels only (``--only-binary=:all:``: no package build script runs anywhere) for the
Python of the run task (``PYEXEC_TARGET_PYTHON``, default this interpreter's version)
into ``/alloc/data/pyexec/site``, which the run task puts on ``PYTHONPATH``.

It always exits 0 and leaves ``install.json`` (``ok``, ``error``, ``output``): the run
task reports a failure as ``setup_failed``, naming what pip could not find.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LOCAL = os.environ.get("NOMAD_TASK_DIR", "/local")
OUT = os.path.join(os.environ.get("NOMAD_ALLOC_DIR", "/alloc"), "data", "pyexec")
OUTPUT_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 300.0


def install(request: dict[str, Any]) -> dict[str, Any]:
    requirements = str(request.get("requirements_txt") or "")
    if not requirements.strip():
        return {"ok": True}
    path = os.path.join(OUT, "requirements.txt")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(requirements)
    version = os.environ.get("PYEXEC_TARGET_PYTHON") or "{}.{}".format(*sys.version_info[:2])
    only_binary = os.environ.get("PYEXEC_PIP_ONLY_BINARY") or ":all:"
    argv = [
        sys.executable, "-m", "pip", "install", "--no-input", "--no-cache-dir",
        "--disable-pip-version-check", "--progress-bar", "off",
        f"--only-binary={only_binary}", "--python-version", version,
        "--target", os.path.join(OUT, "site"), "-r", path,
    ]  # fmt: skip
    timeout = float((request.get("config") or {}).get("timeout_seconds") or DEFAULT_TIMEOUT)
    env = dict(os.environ, HOME="/tmp", PYTHONNOUSERSITE="1")
    try:
        done = subprocess.run(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        output = (exc.output or b"").decode("utf-8", "replace")
        return {"ok": False, "error": f"installing requirements timed out after {timeout} s",
                "output": output[-OUTPUT_BYTES:]}  # fmt: skip
    output = done.stdout.decode("utf-8", "replace")
    sys.stdout.write(output)
    if done.returncode == 0:
        return {"ok": True}
    missing = [
        line.split(" for ", 1)[1].strip()
        for line in output.splitlines()
        if "No matching distribution found for" in line
    ]
    error = f"installing requirements failed (pip exit code {done.returncode})"
    if missing:
        error += f"; no wheel for Python {version}: {', '.join(missing)}"
    return {"ok": False, "error": error, "output": output[-OUTPUT_BYTES:]}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    try:
        with open(os.path.join(LOCAL, "record.json"), "rb") as fh:
            record = json.loads(fh.read() or b"{}")
        result = install(record.get("request") or {})
    except Exception as exc:  # noqa: BLE001 - the run task reports whatever went wrong
        result = {"ok": False, "error": f"the installer failed: {exc!r}", "output": ""}
    tmp = os.path.join(OUT, "install.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, os.path.join(OUT, "install.json"))


if __name__ == "__main__":
    main()
