"""Sync hello-world through the pyexec API on Nomad versus a bare one-task dispatch.

The baseline is a parameterized batch job with one docker task that runs the same
``python3 -c`` in the same image with the run task's sandbox settings (no network,
read-only root, no capabilities, pids limit, tmpfs ``/work`` and ``/tmp``, the same
seccomp profile and runtime), dispatched and waited for through the Nomad API (blocking
queries on the child's allocations until one is ``complete``). The two are interleaved
in one run, ``--pairs`` of each after one warm-up, and the script prints p50/p95 and the
ratio of the p50s. Target: pyexec p50 <= 1.15 x the bare dispatch p50, on a quiet
machine and with both cores busy (``--busy 2`` starts two busy-loop processes for the
measurement and kills them afterwards).

    # a real agent (e.g. `just dev-cluster`), Consul on loopback:
    uv run python bench/nomad_latency.py --nomad http://127.0.0.1:4646 [--busy 2]
    # without --nomad: the test double (tests/nomadsim), figures labelled as such

Traffic goes to loopback only. Requests with requirements are not measured here: the
installer needs a package index, which is not on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import busy_cores, percentile

from pyexec.runner import nomad_job
from pyexec.settings import Settings
from tests.conftest import live_server, make_settings
from tests.fixtures_consul import kv_delete_tree
from tests.tarfiles import make_tar

ROOT = Path(__file__).resolve().parents[1]
HELLO = "print('hi')\n"
TARGET = 1.15
SECOND = 1_000_000_000


def hello_tar() -> bytes:
    return make_tar({"main.py": HELLO})


def bare_job(settings: Settings, job_id: str) -> dict[str, Any]:
    """A one-task parameterized job: the run task's docker config, running ``HELLO``."""
    runner = nomad_job.runner_job(settings, settings.nomad_resource_classes[0])
    (run,) = [t for t in runner["TaskGroups"][0]["Tasks"] if t["Name"] == "run"]
    config = {k: v for k, v in run["Config"].items() if k != "entrypoint"}
    config |= {"image": settings.default_image, "command": "python3", "args": ["-c", HELLO]}
    task = {
        "Name": "run",
        "Driver": "docker",
        "User": run["User"],
        "Config": config,
        "Resources": run["Resources"],
        "KillTimeout": run["KillTimeout"],
    }
    group = runner["TaskGroups"][0]
    return {
        "ID": job_id,
        "Name": job_id,
        "Type": "batch",
        "Datacenters": runner["Datacenters"],
        "ParameterizedJob": {"Payload": "forbidden"},
        "TaskGroups": [
            {
                "Name": "bare",
                "Count": 1,
                "RestartPolicy": group["RestartPolicy"],
                "ReschedulePolicy": group["ReschedulePolicy"],
                "EphemeralDisk": group["EphemeralDisk"],
                "Tasks": [task],
            }
        ],
    }


def bare_dispatch(nomad: httpx.Client, job_id: str) -> float:
    """Seconds from the dispatch until Nomad reports the child's allocation complete."""
    begin = time.perf_counter()
    answer = nomad.post(f"/v1/job/{job_id}/dispatch", json={}).raise_for_status().json()
    child = answer["DispatchedJobID"]
    index = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = nomad.get(
            f"/v1/job/{child}/allocations", params={"index": index, "wait": "30s"}
        ).raise_for_status()
        index = int(response.headers.get("X-Nomad-Index") or 0)
        for alloc in response.json():
            if alloc["ClientStatus"] == "complete":
                elapsed = time.perf_counter() - begin
                nomad.delete(f"/v1/job/{child}", params={"purge": "true"})
                return elapsed
            if alloc["ClientStatus"] in ("failed", "lost"):
                raise RuntimeError(f"the bare dispatch {child} failed: {alloc['ClientStatus']}")
    raise RuntimeError(f"the bare dispatch {child} did not complete within 120 s")


def pyexec_sync(api: httpx.Client, tar: bytes) -> float:
    begin = time.perf_counter()
    response = api.post(
        "/api/v1/exec/sync",
        files={"tar": ("bundle.tar", tar, "application/x-tar")},
        data={"metadata": json.dumps({"entrypoint": "main.py"})},
    )
    elapsed = time.perf_counter() - begin
    body = response.json()
    if response.status_code != 200 or body.get("stdout") != "hi\n":
        raise RuntimeError(f"pyexec answered {response.status_code}: {body}")
    return elapsed


@contextlib.contextmanager
def nomad_endpoint(addr: str | None, consul: str) -> Iterator[tuple[str, str]]:
    """(address, label): the given agent, or a double started here."""
    if addr:
        yield addr, "real Nomad agent"
        return
    from tests.nomadsim import NomadSim

    sim = NomadSim(consul_addr=consul, heartbeat_s=1.0)
    sim.start()
    try:
        yield sim.address, "DOUBLE (tests/nomadsim), not a real agent"
    finally:
        sim.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nomad", help="Nomad HTTP address (default: start the double)")
    parser.add_argument("--consul", default="127.0.0.1:8500")
    parser.add_argument("--image", default="pyexec-runner:bookworm")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes meanwhile")
    parser.add_argument(
        "--seccomp",
        default=str(ROOT / "pyexec" / "sandbox" / "seccomp.json"),
        help="seccomp profile path on the Nomad client ('' for Docker's default)",
    )
    args = parser.parse_args()
    tag = secrets.token_hex(3)
    with nomad_endpoint(args.nomad, args.consul) as (addr, label):
        settings = make_settings(
            nomad_addr=addr,
            consul_addr=args.consul,
            consul_prefix=f"bench-nomad-{tag}",
            nomad_job_prefix=f"bench-{tag}",
            default_image=args.image,
            nomad_seccomp_profile=args.seccomp or None,
            log_level="WARNING",
        )
        bare_id = f"bench-{tag}-bare"
        tar = hello_tar()
        with (
            httpx.Client(base_url=addr, timeout=60) as nomad,
            live_server(settings) as server,
            httpx.Client(base_url=server.url, timeout=120) as api,
        ):
            nomad.put("/v1/jobs", json={"Job": bare_job(settings, bare_id)}).raise_for_status()
            try:
                pyexec_sync(api, tar)  # warm-up: registration, first image use
                bare_dispatch(nomad, bare_id)
                timings: dict[str, list[float]] = {"pyexec": [], "bare": []}
                with busy_cores(args.busy):
                    for i in range(args.pairs):
                        order = ("pyexec", "bare") if i % 2 == 0 else ("bare", "pyexec")
                        for which in order:
                            seconds = (
                                pyexec_sync(api, tar)
                                if which == "pyexec"
                                else bare_dispatch(nomad, bare_id)
                            )
                            timings[which].append(seconds)
            finally:
                with contextlib.suppress(httpx.HTTPError):
                    for stub in nomad.get("/v1/jobs", params={"prefix": f"bench-{tag}"}).json():
                        nomad.delete(f"/v1/job/{stub['ID']}", params={"purge": "true"})
                with contextlib.suppress(httpx.HTTPError):
                    kv_delete_tree(settings.consul_prefix)
    p50 = {k: statistics.median(v) for k, v in timings.items()}
    p95 = {k: percentile(v, 0.95) for k, v in timings.items()}
    ratio = p50["pyexec"] / p50["bare"]
    load = f"{args.busy} busy-loop processes" if args.busy else "quiet"
    print(f"nomad_latency on the {label}; {load}; {args.pairs} interleaved pairs")
    for which, title in (("pyexec", "pyexec sync via API"), ("bare", "bare dispatch + wait")):
        print(f"  {title:22} p50 {p50[which]:.3f} s   p95 {p95[which]:.3f} s")
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"  ratio p50 {ratio:.2f}x (target <= {TARGET}x: {verdict})")
    print(f"  ratio p95 {p95['pyexec'] / p95['bare']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
