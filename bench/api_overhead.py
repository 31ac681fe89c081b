"""Sync hello-world through the pyexec API versus bare `docker run --rm` with the same flags.

Interleaves the two in one run (so machine noise hits both alike) and prints p50/p95 of
each and their ratio. Target: API p50 <= 1.10 x bare docker p50.

Also, in the same run on the embedded default: how long ``POST /api/v1/exec/async``
takes to answer 202 (the record is stored, the launch follows). Targets: p50 <= 20 ms
and <= 0.1 x the bare ``docker run`` p50.

And, with the Consul store (``--consul``, default ``127.0.0.1:8500``; skipped with a
note when no agent answers there): the Consul requests one sync run sends, counted at
the store's HTTP transport. Target: <= 5.

    uv run python bench/api_overhead.py [--runs 30] [--image pyexec-runner:bookworm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import percentile

from pyexec.models import parse_request
from pyexec.runner.docker import DockerRunner
from pyexec.runner.docker_spec import Phase, container_args
from pyexec.store.consul import ConsulStore
from tests.conftest import live_server, make_settings
from tests.fixtures_consul import (
    RecordingTransport,
    consul_url,
    kv_delete_tree,
    new_prefix,
)
from tests.tarfiles import make_tar

HELLO = "print('hello')\n"


def hello_tar() -> bytes:
    return make_tar({"main.py": HELLO})


def docker_argv(
    image: str, memory_mb: int, disk_mb: int, pids: int, runtime: str = "runc"
) -> list[str]:
    """``docker run --rm`` with the local runner's own sandbox flags, running hello-world.

    The flags are translated from ``container_args`` (the one place they are decided), so
    the baseline cannot drift from the sandbox. Only the engine's masked paths have no
    CLI flag; the runner's bootstrap (unpacking the tar over stdin) is what the API adds.
    """
    settings = make_settings(
        default_image=image, default_memory_mb=memory_mb, default_disk_mb=disk_mb,
        default_pids_limit=pids, docker_runtime=runtime,
    )  # fmt: skip
    request = parse_request({"entrypoint": "main.py"}, settings)
    phase = Phase(extract=True, setup=False, run=True, network=False)
    args = container_args(settings, request, "exe_bench", phase)
    host = args["host_config"]
    argv = ["docker", "run", "--rm", "-i", "--runtime", host["runtime"]]
    argv += ["--init"] if host["init"] else []
    argv += ["--user", args["user"], "--workdir", args["working_dir"]]
    argv += ["--network", host["network_mode"] or "bridge"]
    argv += ["--read-only"] if host["read_only"] else []
    for target, options in host["tmpfs"].items():
        argv += ["--tmpfs", f"{target}:{options}"]
    for variable in args["environment"]:
        argv += ["-e", variable]
    argv += ["--memory", f"{host['mem_limit']}b", "--memory-swap", f"{host['memswap_limit']}b"]
    argv += ["--cpu-shares", str(host["cpu_shares"]), "--pids-limit", str(host["pids_limit"])]
    for limit in host["ulimits"]:
        argv += ["--ulimit", f"{limit['Name']}={limit['Soft']}:{limit['Hard']}"]
    for capability in host["cap_drop"]:
        argv += ["--cap-drop", capability]
    for option in host["security_opt"]:
        if option.startswith("seccomp="):  # the CLI takes the profile as a file
            profile = Path(tempfile.gettempdir()) / "pyexec-bench-seccomp.json"
            profile.write_text(option.removeprefix("seccomp="))
            option = f"seccomp={profile}"
        argv += ["--security-opt", option]
    argv += ["--shm-size", f"{host['shm_size']}b"]
    log = host["log_config"]
    argv += ["--log-driver", log["Type"]]
    for key, value in (log.get("Config") or {}).items():
        argv += ["--log-opt", f"{key}={value}"]
    return [*argv, "--entrypoint", "", image, "python3", "-c", HELLO]


def submit_async(http: httpx.Client, tar: bytes) -> float:
    """Seconds until ``POST /exec/async`` answered 202; then waits (untimed) for the end."""
    t0 = time.perf_counter()
    response = http.post(
        "/api/v1/exec/async",
        files={"tar": ("code.tar", tar, "application/x-tar")},
        data={"metadata": json.dumps({"entrypoint": "main.py"})},
    )
    elapsed = time.perf_counter() - t0
    if response.status_code != 202:
        raise RuntimeError(f"async submit failed: {response.status_code} {response.text}")
    record = http.get(response.headers["location"], params={"wait": 60}).json()
    if record.get("stdout") != "hello\n":
        raise RuntimeError(f"async run failed: {record}")
    return elapsed


def consul_requests_per_sync_run(args: argparse.Namespace, tar: bytes) -> list[int] | None:
    """Consul requests each of a few sync runs sent (local Docker runner, Consul store)."""
    try:
        httpx.get(f"{consul_url(args.consul)}/v1/status/leader", timeout=2).raise_for_status()
    except httpx.HTTPError:
        return None
    prefix = new_prefix()
    settings = make_settings(
        default_image=args.image, log_level="WARNING", consul_addr=args.consul,
        consul_prefix=prefix,
    )  # fmt: skip
    transport = RecordingTransport()
    store = ConsulStore.from_settings(settings, transport=transport)
    counts = []
    try:
        with (
            live_server(settings, store=store, runner=DockerRunner(settings)) as server,
            httpx.Client(base_url=server.url, timeout=60) as http,
        ):
            for _ in range(args.consul_runs):
                before = len(transport.requests)
                response = http.post(
                    "/api/v1/exec/sync",
                    files={"tar": ("code.tar", tar, "application/x-tar")},
                    data={"metadata": json.dumps({"entrypoint": "main.py"})},
                )
                if response.json().get("stdout") != "hello\n":
                    raise RuntimeError(f"Consul sync run failed: {response.text}")
                counts.append(len(transport.requests) - before)
    finally:
        kv_delete_tree(prefix, args.consul)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image", default="pyexec-runner:bookworm")
    parser.add_argument("--consul", default="127.0.0.1:8500", help="Consul agent to count against")
    parser.add_argument("--consul-runs", type=int, default=5)
    args = parser.parse_args()

    settings = make_settings(default_image=args.image, log_format="text", log_level="WARNING")
    argv = docker_argv(
        args.image, settings.default_memory_mb, settings.default_disk_mb,
        settings.default_pids_limit,
    )  # fmt: skip
    tar = hello_tar()
    api_times: list[float] = []
    docker_times: list[float] = []
    async_times: list[float] = []
    with live_server(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for i in range(args.warmup + args.runs):
            t0 = time.perf_counter()
            response = http.post(
                "/api/v1/exec/sync",
                files={"tar": ("code.tar", tar, "application/x-tar")},
                data={"metadata": json.dumps({"entrypoint": "main.py"})},
            )
            t1 = time.perf_counter()
            body = response.json()
            if response.status_code != 200 or body.get("stdout") != "hello\n":
                print(f"API run failed: {response.status_code} {body}", file=sys.stderr)
                return 1
            t2 = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            t3 = time.perf_counter()
            if done.returncode != 0 or done.stdout != "hello\n":
                print(f"docker run failed: {done.returncode} {done.stderr}", file=sys.stderr)
                return 1
            async_time = submit_async(http, tar)
            if i >= args.warmup:
                api_times.append(t1 - t0)
                docker_times.append(t3 - t2)
                async_times.append(async_time)
    consul_counts = consul_requests_per_sync_run(args, tar)

    def row(name: str, values: list[float]) -> str:
        return (
            f"{name:<12} p50 {statistics.median(values) * 1000:7.1f} ms"
            f"   p95 {percentile(values, 0.95) * 1000:7.1f} ms"
        )

    ratio50 = statistics.median(api_times) / statistics.median(docker_times)
    ratio95 = percentile(api_times, 0.95) / percentile(docker_times, 0.95)
    print(f"runs: {args.runs} interleaved (after {args.warmup} warm-up pairs)")
    print(row("pyexec API", api_times))
    print(row("docker run", docker_times))
    print(f"ratio        p50 {ratio50:.3f}x   p95 {ratio95:.3f}x   (target <= 1.10x)")
    async50 = statistics.median(async_times)
    print(row("async 202", async_times))
    print(
        f"async submit p50 {async50 * 1000:.1f} ms (target <= 20 ms); "
        f"{async50 / statistics.median(docker_times):.3f}x docker run p50 (target <= 0.1x)"
    )
    if consul_counts is None:
        print(f"Consul requests per sync run: skipped (no Consul agent at {args.consul})")
    else:
        print(
            f"Consul requests per sync run: max {max(consul_counts)} over "
            f"{len(consul_counts)} runs {consul_counts} (target <= 5)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
