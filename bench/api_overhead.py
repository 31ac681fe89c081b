"""Sync hello-world through the pyexec API versus bare `docker run --rm` with the same flags.

Interleaves the two in one run (so machine noise hits both alike) and prints p50/p95 of
each and their ratio. Target: API p50 <= 1.10 x bare docker p50.

    uv run python bench/api_overhead.py [--runs 30] [--image pyexec-runner:bookworm]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import live_server, make_settings

HELLO = "print('hello')\n"


def hello_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("main.py")
        info.size = len(HELLO)
        tar.addfile(info, io.BytesIO(HELLO.encode()))
    return buf.getvalue()


def docker_argv(image: str, memory_mb: int, disk_mb: int, pids: int) -> list[str]:
    """The sandbox flags pyexec's local runner uses, spelled for the docker CLI."""
    return [
        "docker", "run", "--rm", "-i", "--init",
        "--user", "1000:1000",
        "--network", "none",
        "--read-only",
        "--tmpfs", f"/work:rw,exec,nosuid,nodev,size={disk_mb}m,uid=1000,gid=1000,mode=0755",
        "--workdir", "/work",
        "-e", "HOME=/work", "-e", "PYTHONUNBUFFERED=1",
        "--memory", f"{memory_mb}m", "--memory-swap", f"{memory_mb}m",
        "--cpu-shares", "1024",
        "--pids-limit", str(pids),
        "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--ulimit", "nofile=4096:4096",
        "--entrypoint", "",
        "--log-driver", "none",
        image, "python3", "-c", HELLO,
    ]  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(q * (len(ordered) - 1)))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image", default="pyexec-runner:bookworm")
    args = parser.parse_args()

    settings = make_settings(default_image=args.image, log_format="text", log_level="WARNING")
    argv = docker_argv(
        args.image, settings.default_memory_mb, settings.default_disk_mb,
        settings.default_pids_limit,
    )  # fmt: skip
    tar = hello_tar()
    api_times: list[float] = []
    docker_times: list[float] = []
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
            if i >= args.warmup:
                api_times.append(t1 - t0)
                docker_times.append(t3 - t2)

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
