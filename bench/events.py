"""Live output: server memory while 50 subscribers follow one chatty run.

A server (the embedded default: local Docker, in-process store) runs in its own
process, so its RSS is its own. One run prints ``--mib`` MiB of stdout in ~3 s while
``--subscribers`` clients follow ``/events`` from the start (a tenth of them slow:
they pause 50 ms per event, so they fall far behind). Every subscriber must receive
the whole output. Reported: the server's RSS before the run and its peak during it.

Bound (the design: output is held once per run, never per subscriber; each
subscriber holds one event and its socket buffer): RSS growth <= 8 x the output
+ 256 KiB per subscriber. Holding the output once per subscriber would need
``subscribers x output`` (the ratio printed as ``vs per-subscriber copies``).

Measured quiet, then with both cores busy (two busy-loop processes, killed after).

    uv run python bench/events.py [--subscribers 50] [--mib 4] [--image pyexec-runner:bookworm]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import busy_cores

from tests.conftest import free_port

MiB = 1024 * 1024
SLOW_PAUSE = 0.05


def chatty(mib: int) -> str:
    """A program printing ``mib`` MiB of 1 KiB lines over about three seconds."""
    lines = mib * 1024
    return (
        "import sys, time\n"
        f"line = 'x' * 1023 + '\\n'\n"
        f"for i in range({lines}):\n"
        "    sys.stdout.write(line)\n"
        f"    if i % {max(1, lines // 300)} == 0:\n"
        "        sys.stdout.flush(); time.sleep(0.01)\n"
    )


def serve(port: int, image: str) -> None:
    """The server process: the test settings' embedded default, until stdin closes."""
    from tests.conftest import live_server, make_settings

    settings = make_settings(
        port=port, default_image=image, max_event_subscribers=1000, default_max_output_bytes=MiB
    )
    with live_server(settings) as server:
        print(server.url, flush=True)
        sys.stdin.read()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def subscriber(url: str, execution_id: str, slow: bool) -> int:
    """Bytes of output received (the text of the stdout events), reading to the end."""
    got = 0
    with (
        httpx.Client(base_url=url, timeout=120) as http,
        http.stream("GET", f"/api/v1/executions/{execution_id}/events") as response,
    ):
        assert response.status_code == 200, response.status_code
        event = ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "stdout":
                got += len(json.loads(line[5:])["text"]) - line.count("\\n")
                if slow:
                    time.sleep(SLOW_PAUSE)
    return got


def one_run(url: str, pid: int, code: str, subscribers: int, mib: int) -> dict[str, float]:
    with httpx.Client(base_url=url, timeout=120) as http:
        answer = http.post(
            "/api/v1/exec/async",
            files={"tar": ("c.tar", make_tar(code))},
            data={"metadata": f'{{"config": {{"max_output_bytes": {(mib + 1) * MiB}}}}}'},
        )
        execution_id = answer.json()["execution_id"]
    before = rss(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    slow = max(1, subscribers // 10)
    t0 = time.monotonic()
    with ThreadPoolExecutor(subscribers) as pool:
        got = list(pool.map(lambda i: subscriber(url, execution_id, i < slow), range(subscribers)))
    done.set()
    sampler.join()
    expected = mib * 1024 * 1023
    assert all(g == expected for g in got), (expected, sorted(set(got)))
    return {"before": before, "peak": peak, "seconds": time.monotonic() - t0}


def make_tar(code: str) -> bytes:
    from tests.tarfiles import make_tar as tar_of

    return tar_of({"main.py": code})


def measure(url: str, pid: int, subscribers: int, mib: int, label: str) -> bool:
    code = chatty(mib)
    one_run(url, pid, code, 1, mib)  # warm: modules, the Docker client, allocator arenas
    result = one_run(url, pid, code, subscribers, mib)
    growth = result["peak"] - result["before"]
    output = mib * MiB
    bound = 8 * output + subscribers * 256 * 1024
    naive = subscribers * output
    ok = growth <= bound
    print(
        f"{label}: {subscribers} subscribers x {mib} MiB stdout (all received, "
        f"{result['seconds']:.1f} s): server RSS {result['before'] / MiB:.0f} MiB -> peak "
        f"{result['peak'] / MiB:.0f} MiB, growth {growth / MiB:.1f} MiB; bound "
        f"{bound / MiB:.1f} MiB ({'ok' if ok else 'EXCEEDED'}); "
        f"{growth / naive:.3f} x per-subscriber copies ({naive / MiB:.0f} MiB)"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--mib", type=int, default=4)
    parser.add_argument(
        "--image", default=os.environ.get("PYEXEC_TEST_IMAGE", "pyexec-runner:bookworm")
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.image)
        return 0
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(free_port()), "--image", args.image],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        ok = measure(url, server.pid, args.subscribers, args.mib, "quiet")
        with busy_cores(2):
            ok = measure(url, server.pid, args.subscribers, args.mib, "busy ") and ok
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=60)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
