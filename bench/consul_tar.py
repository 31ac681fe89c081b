"""Store and read back a large tar through ConsulStore vs. raw chunked KV PUTs/GETs.

    uv run python bench/consul_tar.py [--size-mib 50] [--reps 3] [--addr 127.0.0.1:8500]

Both paths talk to the same Consul in the same run, with repetitions interleaved
(store, raw, raw, store, ...) so drift in the agent hits both alike. Both read the
tar from the same file on disk in 256 KiB pieces. The baseline is the least any
chunked design can do: one plain ``PUT /v1/kv/<key>`` per piece, then one
``GET ?raw`` per piece (uncompressed, as the store asks), no transactions, no
manifest, no checks.

Reported: median seconds per path (write, read), the ratio store/raw (target <= 1.5),
and memory: peak traced Python allocations (tracemalloc, separate untimed pass) and
peak RSS growth sampled every 10 ms during the timed runs. Target: O(chunk), not O(tar).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import BinaryIO

import anyio
import httpx
import psutil

from pyexec.models import Execution, new_execution_id
from pyexec.settings import Settings
from pyexec.store import CHUNK_SIZE
from pyexec.store.consul import ConsulStore

MiB = 1024 * 1024


class RssSampler:
    """Peak resident memory above the level at start, sampled in a thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


async def store_write(store: ConsulStore, path: str) -> str:
    record = Execution(execution_id=new_execution_id(), request={"entrypoint": "main.py"})
    with open(path, "rb") as fh:  # noqa: ASYNC230 - opening is instant; reads go to a thread
        await store.create(record, fh)
    return record.execution_id


async def store_read(store: ConsulStore, execution_id: str) -> int:
    total = 0
    async for chunk in store.open_tar(execution_id):
        total += len(chunk)
    return total


async def raw_write(client: httpx.AsyncClient, prefix: str, fh: BinaryIO) -> int:
    count = 0
    while piece := await anyio.to_thread.run_sync(fh.read, CHUNK_SIZE):
        response = await client.put(f"/v1/kv/{prefix}/{count:06d}", content=piece)
        response.raise_for_status()
        count += 1
    return count


async def raw_read(client: httpx.AsyncClient, prefix: str, count: int) -> int:
    total = 0
    for i in range(count):
        response = await client.get(f"/v1/kv/{prefix}/{i:06d}", params={"raw": ""})
        response.raise_for_status()
        total += len(response.content)
    return total


async def timed(fn: Callable[[], Awaitable[object]]) -> tuple[float, object]:
    started = time.perf_counter()
    result = await fn()
    return time.perf_counter() - started, result


async def main(size_mib: int, reps: int, addr: str) -> None:
    url = addr if "://" in addr else f"http://{addr}"
    prefix = f"pyexec-bench-{secrets.token_hex(4)}"
    settings = Settings(consul_addr=addr, consul_prefix=prefix, max_tar_bytes=(size_mib + 1) * MiB)
    store = ConsulStore.from_settings(settings)
    # Consul gzips answers when asked; the store reads chunks uncompressed, so does the baseline.
    client = httpx.AsyncClient(base_url=url, timeout=60, headers={"Accept-Encoding": "identity"})
    fd, path = tempfile.mkstemp(prefix="pyexec-bench-", suffix=".tar")
    size = size_mib * MiB
    with os.fdopen(fd, "wb") as out:
        for _ in range(size // MiB):
            out.write(os.urandom(MiB))
    times: dict[str, list[float]] = {k: [] for k in ("store_w", "store_r", "raw_w", "raw_r")}
    rss: dict[str, int] = {"store": 0, "raw": 0}

    async def run_store() -> None:
        with RssSampler() as sampler:
            t_w, eid = await timed(lambda: store_write(store, path))
            t_r, n = await timed(lambda: store_read(store, str(eid)))
        assert n == size
        times["store_w"].append(t_w)
        times["store_r"].append(t_r)
        rss["store"] = max(rss["store"], sampler.growth)
        await store.delete(str(eid))

    async def run_raw() -> None:
        raw_prefix = f"{prefix}/raw/{secrets.token_hex(4)}"
        with RssSampler() as sampler, open(path, "rb") as fh:  # noqa: ASYNC230 - as above
            t_w, count = await timed(lambda: raw_write(client, raw_prefix, fh))
            t_r, n = await timed(lambda: raw_read(client, raw_prefix, int(str(count))))
        assert n == size
        times["raw_w"].append(t_w)
        times["raw_r"].append(t_r)
        rss["raw"] = max(rss["raw"], sampler.growth)
        (await client.delete(f"/v1/kv/{raw_prefix}/", params={"recurse": ""})).raise_for_status()

    try:
        await store.ping()
        for rep in range(reps):
            order = (run_store, run_raw) if rep % 2 == 0 else (run_raw, run_store)
            for run in order:
                await run()
        # Memory, untimed (tracemalloc slows allocation): peak Python allocations per path.
        traced: dict[str, int] = {}
        for name, run in (("store", run_store), ("raw", run_raw)):
            tracemalloc.start()
            await run()
            traced[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            for key in (f"{name}_w", f"{name}_r"):
                times[key].pop()  # the traced run does not count for time
    finally:
        await client.aclose()
        await store.aclose()
        os.unlink(path)
        async with httpx.AsyncClient(base_url=url) as cleanup:
            await cleanup.delete(f"/v1/kv/{prefix}/", params={"recurse": ""})

    med = {k: statistics.median(v) for k, v in times.items()}
    total_store, total_raw = med["store_w"] + med["store_r"], med["raw_w"] + med["raw_r"]
    print(f"tar {size_mib} MiB, {reps} interleaved repetitions, Consul at {addr}")
    print(f"{'':8}{'write s':>10}{'read s':>10}{'total s':>10}{'MiB/s':>9}")
    for name, total in (("store", total_store), ("raw", total_raw)):
        w, r = med[f"{name}_w"], med[f"{name}_r"]
        print(f"{name:8}{w:10.3f}{r:10.3f}{total:10.3f}{2 * size_mib / total:9.1f}")
    print(
        f"ratio store/raw: write {med['store_w'] / med['raw_w']:.2f}x, "
        f"read {med['store_r'] / med['raw_r']:.2f}x, total {total_store / total_raw:.2f}x "
        "(target <= 1.5x)"
    )
    for name in ("store", "raw"):
        print(
            f"memory {name}: peak traced allocations {traced[name] / MiB:.2f} MiB, "
            f"peak RSS growth {rss[name] / MiB:.2f} MiB (tar {size_mib} MiB, "
            f"chunk {CHUNK_SIZE // 1024} KiB)"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=50)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--addr", default=os.environ.get("PYEXEC_TEST_CONSUL_ADDR", "127.0.0.1:8500")
    )
    args = parser.parse_args()
    anyio.run(main, args.size_mib, args.reps, args.addr)
