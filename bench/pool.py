"""Warm pool: sync hello-world through the API with the pool, without it, and bare `docker run`.

In one run, interleaved (machine noise hits all alike), ``--runs`` samples each of:
sync hello-world through a server with the default pool (``PYEXEC_POOL_SIZE=2``), the
same through a server with ``PYEXEC_POOL_SIZE=0``, and a bare ``docker run --rm`` with
the sandbox flags (``bench/api_overhead.py``'s baseline); then eval hello-world with
and without the pool, and a burst of ``--burst`` concurrent sync requests against each
server (every one must print ``hello``). Measured quiet, then with both cores busy
(two busy-loop processes, killed afterwards). Target: pooled p50 <= 0.4x bare docker.

The Nomad part (``--backends nomad``): sync hello-world through a server on Nomad with
a warm pool (``runner/nomad_pool.py``) against a cold one-task dispatch of the same
image with the run task's sandbox settings (``bench/nomad_latency.py``'s baseline:
dispatched and waited for until Nomad reports it complete), interleaved, ``--nomad-runs``
each. On the agent at ``--nomad``/``NOMAD_ADDR``, or one answering on 127.0.0.1:4646,
else on the test double (labelled). Target: pooled p50 <= 0.35x the cold dispatch.

    uv run python bench/pool.py [--runs 20] [--burst 20] [--image pyexec-runner:bookworm]
    uv run python bench/pool.py --backends nomad [--nomad http://127.0.0.1:4646]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import busy_cores, percentile
from api_overhead import docker_argv, hello_tar
from nomad_latency import bare_dispatch, bare_job, nomad_endpoint

from tests.conftest import live_server, make_settings
from tests.fixtures_consul import kv_delete_tree

TARGET = 0.4
NOMAD_TARGET = 0.35
ROOT = Path(__file__).resolve().parents[1]


def sync_run(http: httpx.Client, tar: bytes) -> float:
    t0 = time.perf_counter()
    response = http.post(
        "/api/v1/exec/sync",
        files={"tar": ("code.tar", tar, "application/x-tar")},
        data={"metadata": json.dumps({"entrypoint": "main.py"})},
    )
    elapsed = time.perf_counter() - t0
    if response.status_code != 200 or response.json().get("stdout") != "hello\n":
        raise RuntimeError(f"sync run failed: {response.status_code} {response.text}")
    return elapsed


def eval_run(http: httpx.Client) -> float:
    t0 = time.perf_counter()
    response = http.post("/api/v1/eval", json={"code": "print('hello')"})
    elapsed = time.perf_counter() - t0
    if response.status_code != 200 or response.json().get("stdout") != "hello\n":
        raise RuntimeError(f"eval run failed: {response.status_code} {response.text}")
    return elapsed


def docker_run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0 or done.stdout != "hello\n":
        raise RuntimeError(f"docker run failed: {done.returncode} {done.stderr}")
    return elapsed


def burst(url: str, tar: bytes, count: int) -> list[float]:
    """``count`` sync runs sent at once, each on its own connection; their latencies."""

    def one(_: int) -> float:
        with httpx.Client(base_url=url, timeout=120) as http:
            return sync_run(http, tar)

    with ThreadPoolExecutor(count) as executor:
        return sorted(executor.map(one, range(count)))


def pool_ready(http: httpx.Client) -> int:
    health = http.get("/health").json()
    return sum((health.get("pool") or {}).get("ready", {}).values())


def wait_for_pool(http: httpx.Client, size: int, timeout: float = 60) -> None:
    """Until the pooled server has its sandboxes back (bounded poll of /health)."""
    deadline = time.monotonic() + timeout
    while pool_ready(http) < size:
        if time.monotonic() > deadline:
            raise RuntimeError("the pool did not refill")
        time.sleep(0.05)


def row(name: str, values: list[float]) -> str:
    return (
        f"  {name:<22} p50 {statistics.median(values) * 1000:7.1f} ms"
        f"   p95 {percentile(values, 0.95) * 1000:7.1f} ms"
        f"   max {max(values) * 1000:7.1f} ms   (n={len(values)})"
    )


def measure(args: argparse.Namespace, label: str) -> bool:
    """One interleaved round; prints its table; whether the target held."""
    tar = hello_tar()
    base = {"default_image": args.image, "python_images": (("3.11", args.image),)}
    pooled_settings = make_settings(**base, pool_size=args.pool_size, log_level="WARNING")
    cold_settings = make_settings(**base, pool_size=0, log_level="WARNING")
    argv = docker_argv(
        args.image, cold_settings.default_memory_mb, cold_settings.default_disk_mb,
        cold_settings.default_pids_limit,
    )  # fmt: skip
    times: dict[str, list[float]] = {
        name: [] for name in ("pooled", "cold", "docker", "eval pooled", "eval cold")
    }
    with (
        live_server(pooled_settings) as pooled,
        live_server(cold_settings) as cold,
        httpx.Client(base_url=pooled.url, timeout=60) as pooled_http,
        httpx.Client(base_url=cold.url, timeout=60) as cold_http,
    ):
        wait_for_pool(pooled_http, args.pool_size)
        steps: list[tuple[str, Callable[[], float]]] = [
            ("pooled", lambda: sync_run(pooled_http, tar)),
            ("cold", lambda: sync_run(cold_http, tar)),
            ("docker", lambda: docker_run(argv)),
        ]
        eval_steps: list[tuple[str, Callable[[], float]]] = [
            ("eval pooled", lambda: eval_run(pooled_http)),
            ("eval cold", lambda: eval_run(cold_http)),
        ]
        for rounds, kinds in ((args.runs, steps), (args.eval_runs, eval_steps)):
            for i in range(args.warmup + rounds):
                # Each kind follows each other kind equally often (a `docker run --rm`
                # leaves the engine removing its container while the next one starts).
                shift = i % len(kinds)
                for name, step in kinds[shift:] + kinds[:shift]:
                    if name.endswith("pooled"):
                        # Steady state: the pool refilled since the last request.
                        wait_for_pool(pooled_http, args.pool_size)
                    elapsed = step()
                    if i >= args.warmup:
                        times[name].append(elapsed)
        wait_for_pool(pooled_http, args.pool_size)
        pooled_burst = burst(pooled.url, tar, args.burst)
        cold_burst = burst(cold.url, tar, args.burst)

    p50 = {name: statistics.median(values) for name, values in times.items()}
    ratio = p50["pooled"] / p50["docker"]
    print(f"== {label}: {args.runs} interleaved triples, {args.eval_runs} eval pairs")
    for name, values in times.items():
        print(row(name, values))
    print(f"  pooled / docker run    p50 {ratio:.3f}x   (target <= {TARGET}x)")
    print(f"  cold / docker run      p50 {p50['cold'] / p50['docker']:.3f}x")
    print(f"  eval pooled / cold     p50 {p50['eval pooled'] / p50['eval cold']:.3f}x")
    print(f"  burst of {args.burst} concurrent sync runs, all 'hello':")
    print(row(f"pool size {args.pool_size}", pooled_burst))
    print(row("pool size 0", cold_burst))
    return ratio <= TARGET


def nomad_address(given: str | None) -> str | None:
    """The agent to measure: given, ``NOMAD_ADDR``, or one answering on loopback;
    ``None``: the double."""
    if given == "double":
        return None
    addr = given or os.environ.get("NOMAD_ADDR")
    if addr:
        return addr
    with contextlib.suppress(httpx.HTTPError):
        if httpx.get("http://127.0.0.1:4646/v1/status/leader", timeout=2).is_success:
            return "http://127.0.0.1:4646"
    return None


def measure_nomad(args: argparse.Namespace, label: str) -> bool:
    """Pooled sync runs on Nomad against cold one-task dispatches, interleaved."""
    tag = secrets.token_hex(3)
    tar = hello_tar()
    with nomad_endpoint(nomad_address(args.nomad), args.consul) as (addr, where):
        settings = make_settings(
            nomad_addr=addr,
            consul_addr=args.consul,
            consul_prefix=f"{args.prefix}-{tag}",
            nomad_job_prefix=f"{args.prefix}-{tag}",
            default_image=args.image,
            python_images=(("3.11", args.image),),
            nomad_seccomp_profile=str(ROOT / "pyexec" / "sandbox" / "seccomp.json"),
            pool_size=args.pool_size,
            pool_images=(args.image,),
            log_level="WARNING",
        )
        bare_id = f"{args.prefix}-{tag}-bare"
        times: dict[str, list[float]] = {"nomad pooled": [], "cold dispatch": []}
        with (
            httpx.Client(base_url=addr, timeout=60) as nomad,
            live_server(settings) as server,
            httpx.Client(base_url=server.url, timeout=120) as api,
        ):
            nomad.put("/v1/jobs", json={"Job": bare_job(settings, bare_id)}).raise_for_status()
            try:
                wait_for_pool(api, args.pool_size, timeout=120)
                steps: list[tuple[str, Callable[[], float]]] = [
                    ("nomad pooled", lambda: sync_run(api, tar)),
                    ("cold dispatch", lambda: bare_dispatch(nomad, bare_id)),
                ]
                for i in range(1 + args.nomad_runs):  # one warm-up round
                    shift = i % len(steps)
                    for name, step in steps[shift:] + steps[:shift]:
                        if name == "nomad pooled":
                            wait_for_pool(api, args.pool_size, timeout=120)
                        elapsed = step()
                        if i:
                            times[name].append(elapsed)
            finally:
                with contextlib.suppress(httpx.HTTPError):  # the runner, pool and bare jobs
                    for stub in nomad.get(
                        "/v1/jobs", params={"prefix": f"{args.prefix}-{tag}"}
                    ).json():
                        nomad.delete(f"/v1/job/{stub['ID']}", params={"purge": "true"})
        with contextlib.suppress(httpx.HTTPError):
            kv_delete_tree(settings.consul_prefix)
    ratio = statistics.median(times["nomad pooled"]) / statistics.median(times["cold dispatch"])
    print(f"== Nomad, {label}, on the {where}: {args.nomad_runs} interleaved pairs")
    for name, values in times.items():
        print(row(name, values))
    print(f"  pooled / cold dispatch p50 {ratio:.3f}x   (target <= {NOMAD_TARGET}x)")
    return ratio <= NOMAD_TARGET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--eval-runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=2, help="the default pool size")
    parser.add_argument("--image", default="pyexec-runner:bookworm")
    parser.add_argument(
        "--conditions", default="quiet,busy", help="quiet, busy (two busy-loop processes)"
    )
    parser.add_argument("--backends", default="docker,nomad", help="docker, nomad")
    parser.add_argument(
        "--nomad", help="Nomad address, or 'double' (default: NOMAD_ADDR, :4646, the double)"
    )
    parser.add_argument("--consul", default="127.0.0.1:8500")
    parser.add_argument("--nomad-runs", type=int, default=20)
    parser.add_argument(
        "--prefix", default="bench-pool", help="Nomad job and Consul prefix (a tag is added)"
    )
    args = parser.parse_args()
    met = True
    for backend in args.backends.split(","):
        run = measure_nomad if backend == "nomad" else measure
        for condition in args.conditions.split(","):
            if condition == "busy":
                with busy_cores(2):
                    met &= run(args, "both cores busy")
            else:
                met &= run(args, "quiet")
    print("target met" if met else "target NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
