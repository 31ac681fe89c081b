"""Warm sandboxes that imported a prewarmed set before their run (``PYEXEC_DEPS_POOL_SIZE``).

The program then runs in the interpreter that imported it (``pyexec.sandbox.preload``):
everything it can observe must be what a fresh ``python3 main.py`` shows, except the
modules already in ``sys.modules``. Each probe runs on a runner whose pool keeps a
preloaded sandbox and on one without a pool (a fresh interpreter), and the two results
are compared. The wheels are made here (``tests/wheels.py``): no package index.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import docker
import pytest

from pyexec.deps.preload import preload_modules
from pyexec.models import Reason, RunOutcome
from pyexec.runner.docker import DockerRunner
from pyexec.settings import Settings

from .conftest import TEST_IMAGE
from .fixtures_docker import docker_client, execute, runtime_registered
from .test_deps_cache_docker import deps_settings
from .wheels import make_wheel

__all__ = ["docker_client"]

NOISY = (
    "import os, sys\n"
    "print('noise from the import')\n"
    "print('noise on stderr', file=sys.stderr)\n"
    "FLAVOR = os.environ.get('FLAVOR', 'plain')\n"
    "CWD = os.getcwd()\n"
)
#: Says first whether the program's interpreter had imported the set already.
FLAG = "import sys\nprint('preloaded' if 'preloadme' in sys.modules else 'fresh')\n"

PROBE = (
    FLAG
    + """\
import json, os, resource, __main__
loader = __main__.__loader__
print(json.dumps({
    "argv": sys.argv, "path": sys.path, "orig_argv": sys.orig_argv,
    "main": list(vars(__main__)), "file": __file__, "cached": __cached__,
    "loader": [type(loader).__name__, loader.name, loader.path],
    "spec": repr(__main__.__spec__), "package": __package__,
    "fds": sorted(os.listdir("/proc/self/fd")), "cwd": os.getcwd(),
    "stdin": sys.stdin.read(), "flags": repr(sys.flags),
    "cpu": resource.getrlimit(resource.RLIMIT_CPU),
    "modules": sorted(m for m in sys.modules if not m.startswith("preloadme")),
    "env": {k: v for k, v in os.environ.items() if k != "HOSTNAME"},
    "stdout": [sys.stdout.encoding, sys.stdout.line_buffering, sys.stdout.isatty()],
}, sort_keys=True))
"""
)
RAISES = FLAG + "def f():\n    return {}['missing']\n\ndef g():\n    f()\n\ng()\n"
EXITS = FLAG + "print('out')\nsys.exit('a message and status 1')\n"
SYNTAX = "import sys\nprint('never'\n"
INTERRUPTED = (
    FLAG + "import atexit\natexit.register(lambda: print('atexit ran'))\nraise KeyboardInterrupt\n"
)
#: Children of each start method re-find the program's functions by ``__main__``.
PROCESSES = """\
import inspect, multiprocessing, pickle, sys

if __name__ == "__main__":  # not again in each spawned child
    print("preloaded" if "preloadme" in sys.modules else "fresh")

def square(x):
    return x * x

class Thing:
    pass

if __name__ == "__main__":
    for method in ("fork", "spawn", "forkserver"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            print(method, pool.map(square, range(4)))
    print(type(pickle.loads(pickle.dumps(Thing()))), inspect.getsource(square).split(":")[0])
"""
USES = FLAG + "import preloadme\nprint(preloadme.FLAVOR, preloadme.CWD, preloadme.__file__)\n"

pytestmark = [pytest.mark.docker, pytest.mark.anyio]


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "preloadme", "1.0", {"preloadme/__init__.py": NOISY})
    make_wheel(wheels, "brokenpkg", "1.0", {"brokenpkg/__init__.py": "raise ImportError('no')\n"})
    options: dict[str, object] = {
        "deps_prewarm": (("preloadme",), ("brokenpkg",)),
        "pool_images": (TEST_IMAGE,),
        **overrides,
    }
    return deps_settings(tmp_path, **options)


@pytest.fixture(params=["runc", "runsc"])
async def runners(
    request: pytest.FixtureRequest, tmp_path: Path, docker_client: docker.DockerClient
) -> AsyncIterator[tuple[DockerRunner, DockerRunner, Settings]]:
    """A runner keeping one preloaded sandbox per prewarmed set, and one with no pool,
    sharing one cache; each runtime (gVisor refuses some calls runc allows: ``select``)."""
    runtime = request.param
    if runtime != "runc" and not runtime_registered(docker_client, runtime):
        pytest.skip(f"dockerd has no runtime {runtime!r} (scripts/bootstrap.sh registers runsc)")
    settings = _settings(tmp_path, pool_size=1, deps_pool_size=1, docker_runtime=runtime)
    warm = DockerRunner(settings, docker_client)
    cold = DockerRunner(_settings(tmp_path, pool_size=0, docker_runtime=runtime), docker_client)
    await warm.startup()
    await cold.startup()
    try:
        with anyio.fail_after(120):  # the prewarm builds both sets in the background
            while len(warm.preloaded) < 2:  # noqa: ASYNC110 - the runner's state, bounded
                await anyio.sleep(0.1)
        assert warm.pool is not None
        await warm.pool.wait_ready(None, 1, timeout=60)
        assert warm.pool.ready_preloaded() == {
            f"{TEST_IMAGE} brokenpkg": 1,
            f"{TEST_IMAGE} preloadme": 1,
        }
        # The runner holds the preloaded sets' environments: eviction keeps them.
        assert warm.deps is not None
        assert warm.deps.cache.dir.evict(0) == []
        yield warm, cold, settings
    finally:
        await warm.aclose()
        await cold.aclose()


async def _run(
    runner: DockerRunner,
    client: docker.DockerClient,
    settings: Settings,
    files: dict[str, str | bytes],
    requirements: str = "preloadme",
    **metadata: object,
) -> RunOutcome:
    pool = runner.pool
    if pool is not None:  # a preloaded sandbox is waiting (the steady state)
        await pool.wait_ready(runner.preloaded[TEST_IMAGE, requirements], 1, timeout=60)
    return await execute(runner, client, settings, files, requirements_txt=requirements, **metadata)


def _same(
    warm: RunOutcome, cold: RunOutcome, first: tuple[str, str] = ("preloaded", "fresh")
) -> None:
    """The two runs printed the same (but for the first line: how their interpreter
    began), on both streams, and exited alike."""
    assert warm.reason is cold.reason is Reason.EXITED, (warm.error, cold.error)
    warm_first, _, warm_out = warm.stdout.partition("\n")
    cold_first, _, cold_out = cold.stdout.partition("\n")
    assert (warm_first, cold_first) == first, (warm.stdout, warm.stderr)
    assert (warm_out, warm.stderr, warm.exit_code) == (cold_out, cold.stderr, cold.exit_code)
    assert warm.deps_cache == cold.deps_cache == "hit"


async def test_a_preloaded_program_sees_what_a_fresh_interpreter_shows(
    runners: tuple[DockerRunner, DockerRunner, Settings], docker_client: docker.DockerClient
) -> None:
    """The namespace, path, argv, descriptors, limits and loaded modules of the program,
    its uncaught exception, ``sys.exit`` with a message, a syntax error, an
    interrupt, child processes of each start method: the same on a preloaded sandbox as
    in a fresh interpreter, and nothing the import printed reaches the run's output."""
    warm, cold, settings = runners
    probe = {"main.py": PROBE}
    args = {"script_args": ["a b", "-c"], "stdin": "some input"}
    got = [await _run(r, docker_client, settings, probe, **args) for r in (warm, cold)]
    _same(*got)
    seen = json.loads(got[0].stdout.partition("\n")[2])
    assert seen["argv"] == ["main.py", "a b", "-c"]
    assert seen["fds"] == ["0", "1", "2", "3"]  # the listing's own descriptor is the 4th
    assert "noise" not in got[0].stdout + got[0].stderr
    for program in (RAISES, EXITS, INTERRUPTED, PROCESSES):
        _same(*[await _run(r, docker_client, settings, {"main.py": program}) for r in (warm, cold)])
    syntax = [await _run(r, docker_client, settings, {"main.py": SYNTAX}) for r in (warm, cold)]
    assert syntax[0].stderr == syntax[1].stderr
    assert "SyntaxError" in syntax[0].stderr
    assert syntax[0].exit_code == syntax[1].exit_code == 1
    interrupted = await _run(warm, docker_client, settings, {"main.py": INTERRUPTED})
    assert interrupted.exit_code == 130
    assert interrupted.stdout.splitlines() == ["preloaded", "atexit ran"]


async def test_a_program_that_could_see_a_difference_runs_in_a_fresh_interpreter(
    runners: tuple[DockerRunner, DockerRunner, Settings], docker_client: docker.DockerClient
) -> None:
    """The sandbox hands the program to a fresh interpreter whenever the preloaded one
    could change its result: a request with its own environment variables (read at
    import), a project with a module named like an imported one (the project's must
    win), an environment whose import failed."""
    warm, cold, settings = runners
    flavored = [
        await _run(r, docker_client, settings, {"main.py": USES}, env_vars=["FLAVOR=sour"])
        for r in (warm, cold)
    ]
    _same(*flavored, first=("fresh", "fresh"))
    assert flavored[0].stdout.splitlines()[1].startswith("noise from the import")
    assert "sour /work /opt/pyexec/envs/" in flavored[0].stdout
    shadow = {"main.py": USES, "preloadme.py": "FLAVOR = 'mine'\nCWD = 'here'\n"}
    shadowed = [await _run(r, docker_client, settings, shadow) for r in (warm, cold)]
    _same(*shadowed, first=("fresh", "fresh"))
    assert shadowed[0].stdout.splitlines()[1] == "mine here /work/preloadme.py"
    broken = FLAG + "import brokenpkg\n"
    failed = [
        await _run(r, docker_client, settings, {"main.py": broken}, requirements="brokenpkg")
        for r in (warm, cold)
    ]
    assert failed[0].stderr == failed[1].stderr
    assert failed[0].stderr.rstrip().endswith("ImportError: no")
    assert failed[0].stdout == failed[1].stdout == "fresh\n"


async def test_a_preloaded_program_keeps_every_limit(
    runners: tuple[DockerRunner, DockerRunner, Settings], docker_client: docker.DockerClient
) -> None:
    """It uses the environment's modules as imported, its artifacts come back, the
    timeout ends it."""
    warm, _, settings = runners
    used = await _run(warm, docker_client, settings, {"main.py": USES})
    assert used.stdout.splitlines()[0] == "preloaded"
    # Imported where a fresh program imports it: in its working directory.
    assert used.stdout.splitlines()[1].startswith("plain /work /opt/pyexec/envs/")
    writes = USES + "open('out.txt', 'w').write(preloadme.FLAVOR)\n"
    kept = await _run(warm, docker_client, settings, {"main.py": writes}, artifacts=["*.txt"])
    assert kept.stdout.splitlines()[0] == "preloaded"
    assert [(a.path, a.size) for a in kept.artifacts] == [("out.txt", len("plain"))]
    assert kept.artifacts_truncated is False
    assert kept.artifact_blob is not None
    kept.artifact_blob.close()  # the caller's to close (the service stores it)
    spin = FLAG + "while True:\n    pass\n"
    ended = await _run(
        warm, docker_client, settings, {"main.py": spin}, config={"timeout_seconds": 1}
    )
    assert ended.reason is Reason.TIMEOUT
    assert ended.stdout == "preloaded\n"


def test_the_modules_preloaded_are_those_named_like_the_requested_distributions(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"

    def dist(name: str, *paths: str) -> None:
        info = site / f"{name}-1.0.dist-info"
        info.mkdir(parents=True)
        rows = [f"{path},sha256=x,1" for path in (*paths, f"{info.name}/RECORD")]
        (info / "RECORD").write_text("\n".join(rows) + "\n")

    dist("numpy", "numpy/__init__.py", "numpy.libs/libopenblas.so", "../../bin/f2py")
    dist("scikit_learn", "sklearn/__init__.py", "sklearn/_x.so")
    dist("matplotlib", "matplotlib/__init__.py", "mpl_toolkits/a.py", "pylab.py")
    dist("PyYAML", "yaml/__init__.py", "_yaml/__init__.py")
    dist("python_dateutil", "dateutil/__init__.py")
    dist("twotops", "one/__init__.py", "two/__init__.py")
    dist("notasked", "notasked/__init__.py")
    wanted = ("matplotlib>=3", "numpy==2.1.0", "pyyaml", "scikit-learn", "twotops")
    assert preload_modules(str(site), wanted) == ("matplotlib", "numpy", "sklearn", "yaml")
    assert preload_modules(str(site), ("python-dateutil",)) == ("dateutil",)
    assert preload_modules(str(tmp_path / "none"), ("numpy",)) == ()
