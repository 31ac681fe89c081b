"""The dependency cache on a real Nomad agent whose client has the ``pyexec-deps`` host
volume (``PYEXEC_TEST_NOMAD_ADDR``; docs/deps-cache.md shows the client stanza).

The installer gets tiny wheels from a directory inside the volume (``PIP_FIND_LINKS``
through ``PYEXEC_NOMAD_TASK_ENV``), with no index: nothing leaves the machine.
Without such an agent the tests skip, saying why.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import attrs
import httpx
import pytest

from pyexec.deps.cachedir import CacheDir
from pyexec.settings import Settings

from .conftest import app_client, make_settings
from .fixtures_consul import CONSUL_ADDR, consul_url, kv_delete_tree, new_prefix
from .tarfiles import make_tar
from .wheels import make_wheel

REAL_NOMAD = os.environ.get("PYEXEC_TEST_NOMAD_ADDR")
TASK_CONSUL = os.environ.get("PYEXEC_TEST_NOMAD_CONSUL_ADDR") or consul_url(CONSUL_ADDR)
VOLUME = "pyexec-deps"

pytestmark = [pytest.mark.anyio, pytest.mark.nomad, pytest.mark.consul, pytest.mark.docker]

#: A package name of this test run's own: the node's cache outlives the test.
PACKAGE = f"tinypkg{secrets.token_hex(4)}"
REQ = f"{PACKAGE}==1.0"
PROGRAM = f"""\
import {PACKAGE} as pkg
print(pkg.VERSION)
try:
    open(pkg.__file__, "a")
except OSError as exc:
    print(exc.errno)
"""


def volume_path() -> str:
    """The host path of the agent's ``pyexec-deps`` volume (the agent is on this machine)."""
    if not REAL_NOMAD:
        pytest.skip("needs a real Nomad agent (PYEXEC_TEST_NOMAD_ADDR) with a host volume")
    with httpx.Client(base_url=REAL_NOMAD, timeout=10) as nomad:
        for stub in nomad.get("/v1/nodes").json():
            node = nomad.get(f"/v1/node/{stub['ID']}").json()
            volume = (node.get("HostVolumes") or {}).get(VOLUME)
            if volume:
                return str(volume["Path"])
    pytest.skip(f"no client of {REAL_NOMAD} has the host volume {VOLUME!r}")


@pytest.fixture
def settings() -> Iterator[Settings]:
    root = Path(volume_path())
    wheels = root / f"wheels-{secrets.token_hex(3)}"
    make_wheel(wheels, PACKAGE, "1.0")
    prefix = new_prefix()
    job_prefix = f"pyexec-deps-test-{secrets.token_hex(3)}"
    yield make_settings(
        nomad_addr=REAL_NOMAD,
        consul_addr=CONSUL_ADDR,
        consul_prefix=prefix,
        nomad_consul_addr=TASK_CONSUL,
        nomad_job_prefix=job_prefix,
        nomad_placement_timeout=60.0,
        setup_network=True,
        deps_cache_bytes=10**9,
        deps_index_url=None,
        nomad_deps_volume=VOLUME,
        nomad_task_env=(("PIP_FIND_LINKS", f"/pyexec-deps/{wheels.name}"),),
        default_timeout=120,
    )
    shutil.rmtree(wheels, ignore_errors=True)
    for entry in CacheDir(str(root)).entries():  # this test's environment only
        if PACKAGE in " ".join(entry.requirements):
            CacheDir(str(root)).remove(entry.key)
    with httpx.Client(base_url=str(REAL_NOMAD), timeout=30) as nomad:
        for stub in nomad.get("/v1/jobs", params={"prefix": job_prefix}).json():
            nomad.delete(f"/v1/job/{stub['ID']}", params={"purge": "true"})
    with contextlib.suppress(httpx.HTTPError):
        kv_delete_tree(prefix)


async def test_a_node_builds_once_and_runs_import_read_only(settings: Settings) -> None:
    """The first run with a requirement builds it into the node's volume (miss), the
    second finds it (hit); the run task imports it and a write fails with EROFS."""
    seen = []
    async with app_client(settings) as api:
        for _ in range(2):
            response = await api.post(
                "/api/v1/exec/sync",
                files={"tar": ("code.tar", make_tar({"main.py": PROGRAM}), "application/x-tar")},
                data={"metadata": json.dumps({"entrypoint": "main.py", "requirements_txt": REQ})},
            )
            body = response.json()
            assert body["status"] == "completed", body
            seen.append((body["stdout"], body.get("deps_cache")))
    assert seen == [("1.0\n30\n", "miss"), ("1.0\n30\n", "hit")]


def built_within(cache: CacheDir, seconds: float) -> bool:
    """Whether this test's environment appears in ``cache`` within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not [e for e in cache.entries() if PACKAGE in " ".join(e.requirements)]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


async def test_prewarming_at_start_up_builds_on_the_node(settings: Settings) -> None:
    """With PYEXEC_DEPS_PREWARM the service dispatches the prewarm sysbatch job at start-up;
    the node builds the set, and the first request for it is a hit."""
    warmed = attrs.evolve(settings, deps_prewarm=((REQ,),))
    cache = CacheDir(volume_path())
    async with app_client(warmed) as api:
        # The sysbatch allocation runs on the node: a bounded wait for its environment.
        assert await anyio.to_thread.run_sync(built_within, cache, 90.0)
        response = await api.post(
            "/api/v1/exec/sync",
            files={"tar": ("code.tar", make_tar({"main.py": PROGRAM}), "application/x-tar")},
            data={"metadata": json.dumps({"entrypoint": "main.py", "requirements_txt": REQ})},
        )
    body = response.json()
    assert (body["stdout"], body.get("deps_cache")) == ("1.0\n30\n", "hit"), body
