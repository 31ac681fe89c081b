"""1,000 async executions in flight on the Nomad backend, against nomadsim.

    uv run python bench/nomad_inflight.py [--count 1000] [--batch 25] [--json out.json]

The double holds every dispatch unplaced (as a full cluster would), so all runs sit in
flight at once while the bench samples the pyexec server process (a real `pyexec serve`
subprocess) with psutil: TCP connections it holds open to Nomad, and its RSS. Then the
double places the runs in batches of ``--batch``; each run is a one-line script on the
runner image, and the bench checks that every one finished with the right output.

Targets: at most 2 connections to Nomad while waiting (the event stream, plus at most
one idle kept-alive connection), server RSS at most 250 MB, all runs correct.
Needs Docker, the runner image (PYEXEC_TEST_IMAGE, default pyexec-runner:bookworm) and
Consul on 127.0.0.1:8500 (PYEXEC_TEST_CONSUL_ADDR).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.nomadsim import NomadSim  # noqa: E402 - the double lives in the test tree

IMAGE = os.environ.get("PYEXEC_TEST_IMAGE", "pyexec-runner:bookworm")
CONSUL = os.environ.get("PYEXEC_TEST_CONSUL_ADDR", "127.0.0.1:8500")
CONSUL_URL = CONSUL if "://" in CONSUL else f"http://{CONSUL}"
#: One small class: every run fits it, and the double's node fits a batch of them.
CLASS = "bench:100:128:64"
TARGET_CONNECTIONS = 2
TARGET_RSS_MB = 250


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bundle(code: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = code.encode()
        info = tarfile.TarInfo("main.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@contextlib.contextmanager
def pyexec_server(nomad: str, prefix: str, log: Path) -> Iterator[tuple[str, psutil.Process]]:
    port = free_port()
    env = {
        **os.environ,
        "PYEXEC_HOST": "127.0.0.1",
        "PYEXEC_PORT": str(port),
        "NOMAD_ADDR": nomad,
        "CONSUL_HTTP_ADDR": CONSUL,
        "PYEXEC_CONSUL_PREFIX": prefix,
        "PYEXEC_NOMAD_JOB_PREFIX": f"{prefix}-runner",
        "PYEXEC_NOMAD_RESOURCE_CLASSES": CLASS,
        "PYEXEC_NOMAD_PLACEMENT_TIMEOUT": "7200",
        "PYEXEC_DEFAULT_IMAGE": IMAGE,
        "PYEXEC_DEFAULT_MEMORY_MB": "128",
        "PYEXEC_DEFAULT_DISK_MB": "64",
        "PYEXEC_DEFAULT_TIMEOUT": "60",
        "PYEXEC_CLEANUP_TTL": "7200",
        "PYEXEC_MAX_IN_FLIGHT": "0",  # the point is 1,000 in flight on one replica
        "PYEXEC_LOG_LEVEL": "WARNING",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyexec.cli", "serve"], env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pyexec serve did not come up; see {log}")
            time.sleep(0.2)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nomad_connections(server: psutil.Process, nomad_port: int) -> int:
    return sum(
        1
        for c in server.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == nomad_port and c.status == psutil.CONN_ESTABLISHED
    )


def sample(server: psutil.Process, nomad_port: int, seconds: float) -> dict[str, float]:
    """Max/min connections to Nomad and max RSS over ``seconds`` (every 0.25 s)."""
    conns: list[int] = []
    rss: list[int] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        conns.append(nomad_connections(server, nomad_port))
        rss.append(server.memory_info().rss)
        time.sleep(0.25)
    return {
        "connections_max": max(conns),
        "connections_min": min(conns),
        "rss_mb_max": round(max(rss) / 2**20, 1),
    }


async def submit_all(url: str, count: int) -> list[str]:
    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        gate = asyncio.Semaphore(16)

        async def one(i: int) -> str:
            async with gate:
                response = await client.post(
                    "/api/v1/exec/async",
                    files={"tar": ("b.tar", bundle(f"print({i} * 7)\n"), "application/x-tar")},
                )
            response.raise_for_status()
            execution_id: str = response.json()["execution_id"]
            return execution_id

        return list(await asyncio.gather(*(one(i) for i in range(count))))


def statuses(prefix: str, ids: list[str]) -> dict[str, str]:
    """Each execution's status key, read from Consul 64 keys per transaction."""
    found: dict[str, str] = {}
    with httpx.Client(base_url=CONSUL_URL, timeout=30) as consul:
        for start in range(0, len(ids), 64):
            ops = [
                {"KV": {"Verb": "get", "Key": f"{prefix}/executions/{i}/status"}}
                for i in ids[start : start + 64]
            ]
            answer = consul.put("/v1/txn", json=ops).json()
            for result in answer.get("Results") or []:
                kv = result["KV"]
                found[kv["Key"].split("/")[-2]] = base64.b64decode(kv["Value"]).decode()
    return found


async def verify(url: str, ids: list[str]) -> list[str]:
    """Ids whose record is not `completed` with the expected stdout."""
    wrong: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        gate = asyncio.Semaphore(16)

        async def one(i: int, execution_id: str) -> None:
            async with gate:
                record = (await client.get(f"/api/v1/executions/{execution_id}")).json()
            if record.get("status") != "completed" or record.get("stdout") != f"{i * 7}\n":
                wrong.append(execution_id)

        await asyncio.gather(*(one(i, e) for i, e in enumerate(ids)))
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--hold-seconds", type=float, default=15.0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    prefix = f"pyexec-bench-{secrets.token_hex(4)}"
    log = Path(f"/tmp/{prefix}-server.log")
    report: dict[str, Any] = {"count": args.count, "batch": args.batch}
    sim = NomadSim(heartbeat_s=30.0, node_memory_mb=128 * max(args.batch, 1) * 2)
    nomad = sim.start()
    nomad_port = int(nomad.rsplit(":", 1)[1])
    sim.hold = True
    try:
        with pyexec_server(nomad, prefix, log) as (url, server):
            report["idle"] = sample(server, nomad_port, 2)
            t0 = time.monotonic()
            ids = asyncio.run(submit_all(url, args.count))
            report["submit_seconds"] = round(time.monotonic() - t0, 1)
            deadline = time.monotonic() + 120
            while sim.held < args.count and time.monotonic() < deadline:
                time.sleep(0.5)
            report["held"] = sim.held
            report["waiting"] = sample(server, nomad_port, args.hold_seconds)
            print(json.dumps({"waiting": report["waiting"], "held": sim.held}), flush=True)

            t1 = time.monotonic()
            done = 0
            during: list[int] = []
            rss: list[int] = []
            while done < args.count:
                sim.release(args.batch)
                target = min(done + args.batch, args.count)
                batch_deadline = time.monotonic() + 600
                while True:
                    states = statuses(prefix, ids)
                    done = sum(1 for s in states.values() if s in ("completed", "failed", "killed"))
                    during.append(nomad_connections(server, nomad_port))
                    rss.append(server.memory_info().rss)
                    if done >= target or time.monotonic() > batch_deadline:
                        break
                    time.sleep(0.5)
                print(
                    f"{done}/{args.count} finished after {time.monotonic() - t1:.0f} s", flush=True
                )
                if time.monotonic() > batch_deadline:
                    break
            report["run_seconds"] = round(time.monotonic() - t1, 1)
            report["while_running"] = {
                "connections_max": max(during),
                "rss_mb_max": round(max(rss) / 2**20, 1),
            }
            wrong = asyncio.run(verify(url, ids))
            report["correct"] = args.count - len(wrong)
            report["wrong"] = wrong[:10]
    finally:
        sim.stop()
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{CONSUL_URL}/v1/kv/{prefix}/", params={"recurse": ""})
    waiting = report["waiting"]
    report["targets_met"] = (
        waiting["connections_max"] <= TARGET_CONNECTIONS
        and waiting["rss_mb_max"] <= TARGET_RSS_MB
        and report["correct"] == args.count
    )
    # Ratios against the same server idle (the baseline, measured in this run).
    idle_rss = report["idle"]["rss_mb_max"]
    report["ratios"] = {
        "rss_waiting_over_idle": round(waiting["rss_mb_max"] / idle_rss, 2),
        "rss_running_over_idle": round(
            report.get("while_running", {}).get("rss_mb_max", idle_rss) / idle_rss, 2
        ),
        "connections_waiting_over_target": round(
            waiting["connections_max"] / TARGET_CONNECTIONS, 2
        ),
    }
    text = json.dumps(report, indent=2)
    print(text)
    ratios = report["ratios"]
    print(
        f"ratio  RSS waiting/idle {ratios['rss_waiting_over_idle']:.2f}x  "
        f"running/idle {ratios['rss_running_over_idle']:.2f}x  "
        f"connections/target {ratios['connections_waiting_over_target']:.2f}x"
    )
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
