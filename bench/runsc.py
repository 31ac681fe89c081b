"""Hello-world through the local runner under gVisor (`runsc`) against `runc`.

The same ``DockerRunner`` path (the sandbox's flags, seccomp profile, masked paths),
only ``PYEXEC_DOCKER_RUNTIME`` differs. Interleaved in one run, measured twice: on a
quiet machine, and with both cores busy (two spinning processes, killed afterwards).
Prints p50/p95 of each and the ratio runsc/runc. Needs runsc registered with dockerd
(``scripts/bootstrap.sh`` does it).

    uv run python bench/runsc.py [--runs 10] [--image pyexec-runner:bookworm]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import attrs
import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import busy_cores, percentile

from pyexec.models import Execution, Reason, new_execution_id, parse_request
from pyexec.runner.docker import DockerRunner
from pyexec.settings import Settings
from tests.conftest import make_settings
from tests.fixtures_docker import runtime_registered, tar_chunks
from tests.tarfiles import make_tar

RUNTIMES = ("runc", "runsc")
HELLO = make_tar({"main.py": "print('hello')\n"})


async def hello(runner: DockerRunner, settings: Settings) -> float:
    """Seconds from ``start`` to the outcome of one hello-world run."""
    request = parse_request({}, settings)
    execution = Execution(execution_id=new_execution_id())

    async def on_running(_: object) -> None:
        return None

    before = time.perf_counter()
    await runner.start(execution, request, tar_chunks(HELLO), on_running)
    outcome = await runner.wait(execution.execution_id, 120)
    elapsed = time.perf_counter() - before
    if (outcome.reason, outcome.stdout) != (Reason.EXITED, "hello\n"):
        raise SystemExit(f"unexpected outcome: {outcome}")
    return elapsed


async def measure(
    runners: dict[str, tuple[DockerRunner, Settings]], runs: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(runs):
        for name, (runner, settings) in runners.items():
            times[name].append(await hello(runner, settings))
    return times


def report(label: str, times: dict[str, list[float]]) -> None:
    p50 = {name: percentile(values, 0.5) for name, values in times.items()}
    for name, values in times.items():
        print(
            f"{label:6} {name:6} n={len(values):3} p50 {p50[name] * 1000:7.0f} ms"
            f"   p95 {percentile(values, 0.95) * 1000:7.0f} ms"
        )
    print(f"{label:6} ratio  runsc/runc p50 = {p50['runsc'] / p50['runc']:.2f}x")


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--image", default="pyexec-runner:bookworm")
    args = parser.parse_args()
    client = docker.DockerClient()
    if not runtime_registered(client, "runsc"):
        print("dockerd has no runtime runsc: run scripts/bootstrap.sh first", file=sys.stderr)
        return 2
    base = make_settings(default_image=args.image, log_level="WARNING")
    runners = {}
    for runtime in RUNTIMES:
        settings = attrs.evolve(base, docker_runtime=runtime)
        runners[runtime] = (DockerRunner(settings, client), settings)
    try:
        await measure(runners, 1)  # warm-up: image layers, page cache
        report("quiet", await measure(runners, args.runs))
        with busy_cores(os.cpu_count() or 2):
            report("busy", await measure(runners, args.runs))
    finally:
        for runner, _ in runners.values():
            await runner.aclose()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
