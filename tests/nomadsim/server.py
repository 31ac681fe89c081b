"""NomadSim: the test double's lifecycle and switches; uvicorn serves ``api.Api`` in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import tempfile
import threading
import time
from typing import Any

import docker
import uvicorn

from .api import Api, Hub
from .cluster import Cluster

__all__ = ["NomadSim"]


class NomadSim:
    """A Nomad agent (server + one docker client) for tests; ``start()`` returns its address."""

    def __init__(
        self,
        consul_addr: str | None = None,
        docker_client: Any = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str | None = None,
        data_dir: str | None = None,
        node_cpu_mhz: int = 4000,
        node_memory_mb: int = 8192,
        heartbeat_s: float = 30.0,
        event_buffer: int = 100,
        max_kill_timeout_s: float = 30.0,
        client_gc_max_allocs: int | None = 50,
        client_gc_interval_s: float = 60.0,
    ) -> None:
        self.consul_addr = consul_addr  # what the client renders templates from (default: local)
        self.host = host
        self.port = port
        self.token = token
        self.heartbeat_s = heartbeat_s
        self._own_docker = docker_client is None
        self.docker = docker_client or docker.DockerClient.from_env(max_pool_size=256)
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="nomadsim-")
        root = data_dir or (self._tmp.name if self._tmp else "")
        self.cluster = Cluster(
            self.docker,
            root,
            consul_addr=consul_addr,
            node_cpu_mhz=node_cpu_mhz,
            node_memory_mb=node_memory_mb,
            event_buffer=event_buffer,
            max_kill_timeout_s=max_kill_timeout_s,
            client_gc_max_allocs=client_gc_max_allocs,
            client_gc_interval_s=client_gc_interval_s,
        )
        self.hub = Hub()
        self.cluster.state.listen(self.hub.on_commit)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Listen (again) on the loopback port; returns ``http://host:port``."""
        if self._server is not None:
            return self.address
        # proto must say TCP, or asyncio skips TCP_NODELAY on accepted sockets (40 ms stalls).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            Api(self).app(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
            backlog=4096,
            ws="none",
        )
        server = uvicorn.Server(config)

        async def serve() -> None:
            self.hub.bind(asyncio.get_running_loop())
            await server.serve(sockets=[sock])

        self._server = server
        self._thread = threading.Thread(
            target=asyncio.run, args=(serve(),), name="nomadsim-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("nomadsim: HTTP server did not start")
            time.sleep(0.01)
        return self.address

    def _stop_http(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        loop = self.hub.loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.hub.close_streams)
        server.should_exit = True
        thread.join(timeout=10)
        for sock in getattr(server, "servers", []):
            sock.close()
        self.hub.loop = None
        self._server = self._thread = None

    def set_reachable(self, reachable: bool) -> None:
        """Fault: stop listening (connections refused) or listen again on the same port."""
        if reachable:
            self.start()
        else:
            self._stop_http()

    def stop(self) -> None:
        """Stop HTTP, kill every task, remove containers and alloc dirs. Idempotent."""
        self._stop_http()
        self.cluster.shutdown()
        self._sweep_containers()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        if self._own_docker:
            self.docker.close()
            self._own_docker = False

    def _sweep_containers(self) -> None:
        with contextlib.suppress(docker.errors.DockerException):
            for c in self.docker.containers.list(
                all=True, filters={"label": f"nomadsim.sim={self.cluster.sim_id}"}
            ):
                with contextlib.suppress(docker.errors.DockerException):
                    c.remove(force=True)

    def __enter__(self) -> NomadSim:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test switches --------------------------------------------------------------------
    @property
    def hold(self) -> bool:
        """When true, new placements fail as if the cluster were full (blocked evals).

        It applies when the scheduler thread takes an evaluation up, a moment after the
        dispatch answers: keep it on until ``held`` has counted the dispatches.
        """
        return self.cluster.hold

    @hold.setter
    def hold(self, value: bool) -> None:
        self.cluster.hold = value

    @property
    def node_memory_mb(self) -> int:
        """The node's memory; a group asking for more never places (DimensionExhausted)."""
        return self.cluster.node_memory_mb

    @node_memory_mb.setter
    def node_memory_mb(self, value: int) -> None:
        self.cluster.node_memory_mb = value

    @property
    def node_cpu_mhz(self) -> int:
        """The node's CPU in MHz; a group asking for more never places."""
        return self.cluster.node_cpu_mhz

    @node_cpu_mhz.setter
    def node_cpu_mhz(self, value: int) -> None:
        self.cluster.node_cpu_mhz = value

    @property
    def held(self) -> int:
        return len(self.cluster.held)

    def release(self, n: int) -> int:
        """Place the next ``n`` held dispatches; returns how many were placed."""
        return self.cluster.release(n)

    def fail_dispatch(
        self, text: str | None = "rpc error: No cluster leader", times: int | None = None
    ) -> None:
        """Make dispatches answer 500 with ``text``: the next ``times`` ones, or all of them
        until called with None."""
        self.cluster.dispatch_failure = text
        self.cluster.dispatch_failures_left = times

    def lose(self, alloc_id: str) -> None:
        """Fault: the node under ``alloc_id`` dies (ClientStatus lost, no poststop)."""
        self.cluster.lose(alloc_id)

    def gc(self) -> None:
        self.cluster.gc()
