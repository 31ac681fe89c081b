"""Warm dependency environments: eval of numpy from the cache against a plain eval.

Two servers on the embedded default (local Docker) share one dependency cache in a
temporary directory, its builder fetching wheels from the package index through
``PYEXEC_CA_BUNDLE`` (the host's CA bundle) for the cold builds only: one with the
default warm pool (``PYEXEC_POOL_SIZE=2``) and numpy and pandas prewarmed with the
default ``PYEXEC_DEPS_POOL_SIZE=1`` (a sandbox per set that imported it before its
request; each pooled request waits until the pool has refilled, the steady state),
one without a pool (every run starts a container). It measures, in one run:

- the cold build: the first eval of ``import numpy as np; np.arange(10).sum()`` and of
  a two-row pandas DataFrame (each builds its environment once);
- then ``--runs`` interleaved rounds, the order rotated each round, of eval
  ``sum(range(10))``, numpy warm and pandas warm on each server (every one checked for
  its result); eval's auto-detected requirements come from the cache, the run
  installs nothing.

Measured quiet, then with both cores busy (two busy-loop processes, killed
afterwards). Target: numpy warm p50 <= 1.5x the plain call's, on each server.

    uv run python bench/deps_cache.py [--runs 12] [--image pyexec-runner:bookworm]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import busy_cores, percentile
from pool import wait_for_pool

from tests.conftest import CA_BUNDLE, live_server, make_settings

TARGET = 1.5
CASES = {
    "plain": ("sum(range(10))", "45"),
    "numpy": ("import numpy as np\nnp.arange(10).sum()", "np.int64(45)"),
    "pandas": (
        "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})",
        "   a  b\n0  1  x\n1  2  y",
    ),
}


def evaluate(http: httpx.Client, case: str) -> tuple[float, dict[str, Any]]:
    code, expected = CASES[case]
    t0 = time.perf_counter()
    response = http.post("/api/v1/eval", json={"code": code, "eval_last_expr": True})
    elapsed = time.perf_counter() - t0
    body = response.json()
    if response.status_code != 200 or body.get("result") != expected:
        raise RuntimeError(f"eval {case} failed: {response.status_code} {body}")
    return elapsed, body


def row(name: str, values: list[float]) -> str:
    return (
        f"  {name:<22} p50 {statistics.median(values) * 1000:7.1f} ms"
        f"   p95 {percentile(values, 0.95) * 1000:7.1f} ms"
        f"   max {max(values) * 1000:7.1f} ms   (n={len(values)})"
    )


PREWARM = (("numpy",), ("pandas",))


def server_settings(args: argparse.Namespace, cache: str, pooled: bool) -> Any:
    base = {
        "default_image": args.image,
        "python_images": (("3.11", args.image),),
        "log_level": "WARNING",
        "default_timeout": 300,
        "default_memory_mb": 1024,
        "setup_network": True,  # eval detects imports; the trusted builder has the network
        "ca_bundle": CA_BUNDLE,
        "deps_cache_bytes": 4096 * 1024 * 1024,
        "deps_cache_dir": cache,
    }
    if not pooled:
        return make_settings(**base, pool_size=0)
    return make_settings(
        **base,
        pool_size=args.pool_size,
        deps_prewarm=PREWARM if args.deps_pool_size else (),
        deps_pool_size=args.deps_pool_size,
    )


def steady(args: argparse.Namespace) -> int:
    """Sandboxes the pooled server has ready when it has refilled."""
    return args.pool_size + len(PREWARM) * args.deps_pool_size


@contextlib.contextmanager
def serving(args: argparse.Namespace, cache: str, pooled: bool) -> Iterator[httpx.Client]:
    with (
        live_server(server_settings(args, cache, pooled)) as live,
        httpx.Client(base_url=live.url, timeout=600) as http,
    ):
        yield http


def measure(args: argparse.Namespace, label: str, cache: str, cold: bool) -> bool:
    names = [f"{case}, {server}" for server in ("pooled", "no pool") for case in CASES]
    times: dict[str, list[float]] = {name: [] for name in names}
    with serving(args, cache, pooled=False) as unpooled:
        if cold:  # before the pooled server starts: its prewarm finds them built
            for case in ("numpy", "pandas"):
                elapsed, body = evaluate(unpooled, case)
                print(
                    f"  cold {case:<8} {elapsed:7.2f} s   deps_cache={body.get('deps_cache')}"
                    f"  auto_requirements={body.get('auto_requirements')}"
                )
        with serving(args, cache, pooled=True) as pooled:

            def pooled_eval(case: str) -> tuple[float, dict[str, Any]]:
                wait_for_pool(pooled, steady(args))  # steady state: the pool refilled
                return evaluate(pooled, case)

            steps: list[tuple[str, Callable[[], tuple[float, dict[str, Any]]]]] = [
                *((f"{case}, pooled", lambda case=case: pooled_eval(case)) for case in CASES),
                *(
                    (f"{case}, no pool", lambda case=case: evaluate(unpooled, case))
                    for case in CASES
                ),
            ]
            hits = 0
            for i in range(args.warmup + args.runs):
                shift = i % len(steps)
                for name, step in steps[shift:] + steps[:shift]:
                    elapsed, body = step()
                    if i >= args.warmup:
                        times[name].append(elapsed)
                        hits += body.get("deps_cache") == "hit"
    p50 = {name: statistics.median(values) for name, values in times.items()}
    print(f"== {label}: {args.runs} interleaved rounds ({hits} cache hits)")
    for name, values in times.items():
        print(row(name, values))
    met = True
    for server in ("pooled", "no pool"):
        ratio = p50[f"numpy, {server}"] / p50[f"plain, {server}"]
        met &= ratio <= TARGET
        print(f"  numpy warm / plain, {server:<8} p50 {ratio:.3f}x   (target <= {TARGET}x)")
        pandas = p50[f"pandas, {server}"] / p50[f"plain, {server}"]
        print(f"  pandas warm / plain, {server:<7} p50 {pandas:.3f}x")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--image", default="pyexec-runner:bookworm")
    parser.add_argument("--pool-size", type=int, default=2, help="the default pool size")
    parser.add_argument(
        "--deps-pool-size",
        type=int,
        default=1,
        help="preloaded sandboxes per prewarmed set (numpy, pandas) on the pooled server "
        "(the default PYEXEC_DEPS_POOL_SIZE; 0: the plain pool serves them)",
    )
    parser.add_argument(
        "--conditions", default="quiet,busy", help="quiet, busy (two busy-loop processes)"
    )
    args = parser.parse_args()
    met = True
    with tempfile.TemporaryDirectory(prefix="pyexec-deps-bench-") as cache:
        for n, condition in enumerate(args.conditions.split(",")):
            if condition == "busy":
                with busy_cores(2):
                    met &= measure(args, "both cores busy", cache, cold=n == 0)
            else:
                met &= measure(args, "quiet", cache, cold=n == 0)
    print("target met" if met else "target NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
