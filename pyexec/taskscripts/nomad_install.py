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

With the node's dependency cache mounted (``PYEXEC_DEPS_DIR``: the job's host volume,
read-write here and read-only in the run task) and requirements the cache takes, it
uses the cache's rules (``pyexec/deps/cachedir.py``, shipped beside this file, with
``build_env.py``'s pip command line): a finished environment of the key is handed over
as it is (``deps_cache: hit``), otherwise it is built once under the key's build lock,
its marker written last and checked, published, and the cache evicted down to
``PYEXEC_DEPS_CACHE_BYTES`` (``miss``). ``install.json`` then names the environment's
``site`` and use lock for the run task. With ``PYEXEC_DEPS_PREWARM_SETS`` (the prewarm
job, a sysbatch dispatched on every node) it builds those sets instead and exits 0 when
all are ready.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

LOCAL = os.environ.get("NOMAD_TASK_DIR", "/local")
OUT = os.path.join(os.environ.get("NOMAD_ALLOC_DIR", "/alloc"), "data", "pyexec")
OUTPUT_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 300.0


#: The Nomad installer hands an environment to the run task, which takes its use lock
#: moments later: eviction leaves environments handed out this recently alone.
HANDOVER_GRACE_SECONDS = 600.0
#: Pauses while another allocation on this node builds the same environment.
LOCK_POLL_SECONDS = (0.1, 2.0)


def _deps_rules() -> dict[str, Any] | None:
    """The cache's rules and the builder's pip command line, if shipped beside this file."""
    here = os.path.dirname(os.path.abspath(__file__))
    rules: dict[str, Any] = {"__name__": "pyexec_deps"}
    for module in ("cachedir.py", "build_env.py"):
        path = os.path.join(here, module)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as fh:
            exec(compile(fh.read(), module, "exec"), rules)  # noqa: S102 - our own module
    return rules


def pip_failure(code: int, output: str, version: str) -> dict[str, Any]:
    missing = [
        line.split(" for ", 1)[1].strip()
        for line in output.splitlines()
        if "No matching distribution found for" in line
    ]
    error = f"installing requirements failed (pip exit code {code})"
    if missing:
        error += f"; no wheel for Python {version}: {', '.join(missing)}"
    return {"ok": False, "error": error, "output": output[-OUTPUT_BYTES:]}


def install_cached(
    rules: dict[str, Any], requirements: list[str], timeout: float
) -> dict[str, Any]:
    """Hand over the node's environment of ``requirements``, building it once if needed."""
    cache = rules["CacheDir"](os.environ["PYEXEC_DEPS_DIR"])
    cache.prepare()
    libc, libc_version = platform.libc_ver()
    target = {
        "python": os.environ.get("PYEXEC_TARGET_PYTHON") or "{}.{}".format(*sys.version_info[:2]),
        "machine": platform.machine(),
        "libc": libc or "musl",
        "libc_version": libc_version or "1.2",
    }
    installer = {
        "image": os.environ.get("PYEXEC_DEPS_BUILDER_IMAGE") or "",
        "index_url": os.environ.get("PYEXEC_DEPS_INDEX_URL") or None,
        "find_links": None,
        "only_binary": os.environ.get("PYEXEC_PIP_ONLY_BINARY") or ":all:",
    }
    describe = {"requirements": requirements, "target": target, "installer": installer}
    key = rules["key_digest"](describe)
    deadline = time.monotonic() + timeout
    status = "hit"
    if cache.ready(key) is None:
        status = "miss"
        delay, longest = LOCK_POLL_SECONDS
        fd = cache.try_build_lock(key)
        while fd is None:
            if time.monotonic() >= deadline:
                return {"ok": False, "error": "gave up waiting for another build on this node"}
            time.sleep(delay)
            delay = min(delay * 1.5, longest)
            fd = cache.try_build_lock(key)
        try:
            if cache.ready(key) is None:
                failure = build(rules, cache, key, describe, deadline)
                if failure is not None:
                    return failure
                cap = int(os.environ.get("PYEXEC_DEPS_CACHE_BYTES") or 0)
                cache.evict(cap, grace=HANDOVER_GRACE_SECONDS)
        finally:
            cache.unlock(fd)
    use = cache.try_use(key)  # marks it as just handed out (the grace above)
    if use is not None:
        cache.unlock(use)
    return {
        "ok": True,
        "deps_cache": status,
        "deps_site": cache.site(key),
        "deps_lock": os.path.join(cache.root, "locks", key + ".use"),
    }


def build(
    rules: dict[str, Any], cache: Any, key: str, describe: dict[str, Any], deadline: float
) -> dict[str, Any] | None:
    """Build ``key`` into a fresh build directory and publish it; a failure's result."""
    target = describe["target"]
    path = cache.new_build(key)
    job = {
        "requirements": describe["requirements"],
        "python": target["python"],
        "platforms": rules["wheel_platforms"](
            target["machine"], target["libc"], target["libc_version"]
        ),
        "only_binary": describe["installer"]["only_binary"],
        "index_url": describe["installer"]["index_url"],
        "find_links": None,
        "build": path,
    }
    env = dict(os.environ, HOME="/tmp", PYTHONNOUSERSITE="1")
    try:
        done = subprocess.run(
            rules["pip_argv"](job), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, timeout=max(deadline - time.monotonic(), 1.0), check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        shutil.rmtree(path, ignore_errors=True)
        return {"ok": False, "error": "building the environment timed out"}
    output = done.stdout.decode("utf-8", "replace")
    sys.stdout.write(output)
    if done.returncode != 0:
        shutil.rmtree(path, ignore_errors=True)
        return pip_failure(done.returncode, output, target["python"])
    rules["write_marker"](path, key, describe)
    if cache.publish(path, key) is None:
        return {"ok": False, "error": "the environment did not match its marker"}
    return None


def install(request: dict[str, Any]) -> dict[str, Any]:
    requirements = str(request.get("requirements_txt") or "")
    if not requirements.strip():
        return {"ok": True, "empty": True}
    timeout = float((request.get("config") or {}).get("timeout_seconds") or DEFAULT_TIMEOUT)
    rules = _deps_rules() if os.environ.get("PYEXEC_DEPS_DIR") else None
    if rules is not None:
        try:
            normal = list(rules["normalise_requirements"](requirements))
        except ValueError:  # NotCacheable: installed for this run alone, as without a cache
            normal = []
        if normal:
            return install_cached(rules, normal, timeout)
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
    return pip_failure(done.returncode, output, version)


def prewarm(sets: list[list[str]]) -> int:
    """The prewarm job's mode (``PYEXEC_DEPS_PREWARM_SETS``): build each set into this
    node's cache unless it is there; 0 when all are ready."""
    rules = _deps_rules()
    if rules is None:
        print("pyexec: the cache's rules are not shipped beside this script", file=sys.stderr)
        return 1
    timeout = float(os.environ.get("PYEXEC_DEPS_BUILD_TIMEOUT") or DEFAULT_TIMEOUT)
    failed = 0
    for requirements in sets:
        result = install_cached(rules, list(requirements), timeout)
        state = result.get("deps_cache") if result.get("ok") else result.get("error")
        print(f"pyexec: {' '.join(requirements)}: {state}", flush=True)
        failed += not result.get("ok")
    return 1 if failed else 0


def main() -> None:
    sets = os.environ.get("PYEXEC_DEPS_PREWARM_SETS")
    if sets:
        sys.exit(prewarm(json.loads(sets)))
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
