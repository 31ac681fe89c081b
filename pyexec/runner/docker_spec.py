"""What the local Docker runner asks the engine for, as data (pure functions).

``plan`` says which containers an execution needs, ``container_args`` what each one
is created with, ``bootstrap_spec`` what its bootstrap is told on stdin. Nothing
here talks to Docker, so the whole sandbox policy can be shown and tested as values.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from docker.types import LogConfig, Mount, Ulimit

from pyexec.artifacts import MAX_ARTIFACT_FILES, blob_overhead
from pyexec.deadline import SLACK_SECONDS
from pyexec.deps.cachedir import ENVS, SITE
from pyexec.models import ExecutionRequest
from pyexec.sandbox import Preload, bootstrap_command, seccomp_profile
from pyexec.settings import Settings

__all__ = [
    "CA_TARGET",
    "DEPS_TARGET",
    "LABEL_EXECUTION",
    "LABEL_MANAGED",
    "LABEL_NONCE",
    "LABEL_OWNER",
    "LABEL_PHASE",
    "LOG_SLACK_BYTES",
    "MASKED_PATHS",
    "NOFILE",
    "RUNSC_MEMORY_OVERHEAD_MB",
    "RUNSC_PIDS_OVERHEAD",
    "SANDBOX_DEADLINE_GRACE",
    "WORKDIR",
    "DiskShares",
    "Phase",
    "artifact_grace",
    "bootstrap_spec",
    "container_args",
    "deps_path",
    "deps_root",
    "disk_shares",
    "labels",
    "plan",
    "volume_args",
]

LABEL_MANAGED = "pyexec.managed"
LABEL_EXECUTION = "pyexec.execution_id"
#: ``host:pid`` of the service process that pumps the container.
LABEL_OWNER = "pyexec.owner"
#: ``run`` on a container that runs the program (after its setup, if any), else ``setup``.
LABEL_PHASE = "pyexec.phase"
#: The nonce of the bootstrap's artifacts mark on a run container (``pyexec.artifacts``):
#: a restarted service reads an adopted run's artifacts with it. The engine never shows
#: a container its labels, so the sandbox cannot learn it from there.
LABEL_NONCE = "pyexec.artifacts_nonce"
SANDBOX_USER = "1000:1000"
WORKDIR = "/work"
CA_TARGET = "/usr/local/share/pyexec/ca.crt"
#: Where a run sees the finished dependency environments (read-only; ``pyexec.deps``).
DEPS_TARGET = "/opt/pyexec/envs"
MiB = 1024 * 1024
#: Open files per sandbox process.
NOFILE = 4096
#: Seconds past the timeout before the in-container CPU backstop can fire.
CPU_BACKSTOP_SLACK = 60
#: Room in a run container's engine log beyond its output caps (framing, control lines).
LOG_SLACK_BYTES = 1024 * 1024
#: Seconds the bootstrap's own deadline comes after the runner's.
SANDBOX_DEADLINE_GRACE = 0.5
#: Time allowed for collecting artifacts after a run: this much, plus the cap at this rate.
ARTIFACT_SECONDS = 5.0
ARTIFACT_RATE = 32 * MiB
ARTIFACT_GRACE_MAX = SLACK_SECONDS / 2
#: Processes and threads gVisor's own sandbox (sentry, gofer) holds in the container's
#: pids cgroup under ``runsc``, added to the run's ``pids_limit`` (it needs about 40).
RUNSC_PIDS_OVERHEAD = 64
#: Memory (MiB) gVisor's sandbox itself needs in the container's memory cgroup under
#: ``runsc``, added to the run's ``memory_mb`` (hello-world does not start in 16 MiB).
RUNSC_MEMORY_OVERHEAD_MB = 64
#: Most of a run's disk budget that /tmp, and /dev/shm, may each take.
SCRATCH_MAX_KIB = 64 * 1024
#: What a run must not read of the host: empty files and directories in its place.
#: It replaces the engine's own list, so that list is part of it (first line);
#: a path the kernel does not have is skipped. /proc/cpuinfo, /proc/stat,
#: /proc/loadavg, /proc/uptime and /sys/devices/system/cpu stay: libc and common
#: libraries read them (the CPU count, load). See docs/security.md for what remains.
MASKED_PATHS = (
    *("/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats"),
    *("/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi"),
    *("/sys/firmware", "/sys/devices/virtual/powercap"),
    # The host's memory, disks, devices, modules and boot line.
    *("/proc/meminfo", "/proc/vmstat", "/proc/zoneinfo", "/proc/buddyinfo"),
    *("/proc/pagetypeinfo", "/proc/slabinfo", "/proc/vmallocinfo", "/proc/swaps"),
    *("/proc/diskstats", "/proc/partitions", "/proc/mdstat", "/proc/modules"),
    *("/proc/kallsyms", "/proc/iomem", "/proc/ioports", "/proc/cmdline", "/proc/config.gz"),
    *("/proc/devices", "/proc/interrupts", "/proc/softirqs", "/proc/locks", "/proc/mtrr"),
    *("/proc/misc", "/proc/consoles", "/proc/dma", "/proc/crypto", "/proc/key-users"),
    *("/proc/pressure", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/driver", "/proc/tty"),
    *("/sys/block", "/sys/class/block", "/sys/dev/block", "/sys/devices/virtual/block"),
    *("/sys/devices/virtual/dmi", "/sys/class/dmi", "/sys/bus", "/sys/module", "/sys/kernel"),
    *("/sys/hypervisor", "/sys/power", "/sys/devices/system/memory", "/sys/devices/system/node"),
    *("/sys/devices/platform", "/sys/devices/pci0000:00", "/sys/devices/LNXSYSTM:00"),
)


@attrs.frozen
class Phase:
    """One container of an execution."""

    extract: bool  # unpack the tar into /work
    setup: bool  # install requirements and run pre_commands
    run: bool  # run the entrypoint
    network: bool


def plan(request: ExecutionRequest, settings: Settings) -> tuple[Phase, ...]:
    """The containers an execution needs: one, or setup then run when their networks differ."""
    run_network = not request.config.network_disabled
    if not request.needs_setup:
        return (Phase(extract=True, setup=False, run=True, network=run_network),)
    if settings.setup_network == run_network:
        return (Phase(extract=True, setup=True, run=True, network=run_network),)
    return (
        Phase(extract=True, setup=True, run=False, network=settings.setup_network),
        Phase(extract=False, setup=False, run=True, network=run_network),
    )


def deps_root(settings: Settings) -> str | None:
    """The host directory of finished dependency environments, when the cache is on and
    the runner has made it (``pyexec.deps``); runs mount it read-only."""
    if settings.deps_cache_bytes <= 0:
        return None
    envs = os.path.join(settings.deps_cache_dir, ENVS)
    return envs if os.path.isdir(envs) else None


def deps_path(digest: str) -> str:
    """Where a run sees the cached environment ``digest`` (on its ``PYTHONPATH``)."""
    return f"{DEPS_TARGET}/{digest}/{SITE}"


def labels(execution_id: str, owner: str) -> dict[str, str]:
    """The labels every container and volume of an execution carries."""
    return {LABEL_MANAGED: "1", LABEL_EXECUTION: execution_id, LABEL_OWNER: owner}


@attrs.frozen
class DiskShares:
    """How a run's ``disk_mb`` is split between its writable mounts (KiB each)."""

    work: int
    tmp: int
    shm: int


def disk_shares(disk_mb: int) -> DiskShares:
    """/tmp and /dev/shm each get an eighth of ``disk_mb`` (at most 64 MiB), /work the
    rest: all the run can write adds up to its disk budget (tmpfs pages also count
    against its memory)."""
    total = disk_mb * 1024
    scratch = min(total // 8, SCRATCH_MAX_KIB)
    return DiskShares(work=total - 2 * scratch, tmp=scratch, shm=scratch)


def _work_options(request: ExecutionRequest) -> str:
    """Mount options of /work, a tmpfs of the container's own or a volume's alike."""
    size = disk_shares(request.config.disk_mb).work
    return f"nosuid,nodev,size={size}k,uid=1000,gid=1000,mode=0755"


def _log_config(settings: Settings, request: ExecutionRequest, phase: Phase) -> LogConfig:
    """A run container's output is kept by the engine too (its ``local`` log, bounded),
    so that a restarted service can read what a run did while nobody attached, its
    artifacts (a tar after the output on stdout) included."""
    if not phase.run:
        return LogConfig(type="none")
    # Both streams at their cap, plus the engine's framing of many small writes, plus
    # the artifacts' tar. Without artifacts, room for the default cap: the size is only
    # a bound, and a run then fits a pooled sandbox made for either kind.
    cap = (
        request.config.max_artifact_bytes
        if request.artifacts
        else settings.default_max_artifact_bytes
    )
    size = 4 * request.config.max_output_bytes + LOG_SLACK_BYTES + cap + blob_overhead()
    options = {"max-size": str(size), "max-file": "1", "compress": "false"}
    return LogConfig(type="local", config=options)


def container_args(
    settings: Settings,
    request: ExecutionRequest,
    execution_id: str,
    phase: Phase,
    volume: str | None = None,
    owner: str = "",
    nonce: str = "",
    preload: Preload | None = None,
) -> dict[str, Any]:
    """Arguments of ``APIClient.create_container``, with ``host_config`` as the keyword
    arguments of ``create_host_config`` (a pure function of its arguments and of whether
    the dependency cache's directory exists: shown and tested as data).

    With the dependency cache on, every container that runs a program gets the finished
    environments read-only at ``DEPS_TARGET`` (``deps_root``), whether it has requirements
    or not: one shape for all, so a warm pool's sandbox can serve a run with a cached
    environment too (the bootstrap is told which one). ``nonce``: the artifacts mark's,
    kept as a label (``LABEL_NONCE``). ``preload``: the bootstrap starts the program's
    interpreter at once with these modules of a cached environment imported (a warm
    pool's sandbox for a prewarmed set: ``pyexec.sandbox.preload``)."""
    config = request.config
    gvisor = settings.docker_runtime == "runsc"
    memory = (config.memory_mb + (RUNSC_MEMORY_OVERHEAD_MB if gvisor else 0)) * MiB
    mounts = []
    # Sticky and world-writable like any /tmp; noexec (the engine's default for tmpfs).
    tmpfs = {"/tmp": f"rw,nosuid,nodev,size={disk_shares(config.disk_mb).tmp}k,mode=1777"}
    if volume is None:
        tmpfs[WORKDIR] = f"rw,exec,{_work_options(request)}"
    else:
        mounts.append(Mount(WORKDIR, volume, type="volume"))
    if phase.setup and settings.ca_bundle:
        mounts.append(Mount(CA_TARGET, settings.ca_bundle, type="bind", read_only=True))
    envs = deps_root(settings)
    if envs is not None and phase.run:
        mounts.append(Mount(DEPS_TARGET, envs, type="bind", read_only=True))
    host_config: dict[str, Any] = {
        "network_mode": None if phase.network else "none",
        "runtime": settings.docker_runtime,
        "read_only": True,
        "tmpfs": tmpfs,
        "mounts": mounts or None,
        "mem_limit": memory,
        "memswap_limit": memory,
        "cpu_shares": config.cpu_shares,
        "pids_limit": config.pids_limit + (RUNSC_PIDS_OVERHEAD if gvisor else 0),
        # The engine's default (often a million) times pids_limit processes is a lot of
        # kernel memory; a script needs a few thousand descriptors at most.
        "ulimits": [Ulimit(name="nofile", soft=NOFILE, hard=NOFILE)],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges", f"seccomp={seccomp_profile()}"],
        "shm_size": disk_shares(config.disk_mb).shm * 1024,
        "log_config": _log_config(settings, request, phase),
        "init": True,
    }
    return {
        "image": request.docker_image,
        # The image's own ENTRYPOINT (a shell wrapper, an init script) would get the
        # bootstrap as its arguments and may run anything first: reset it.
        "entrypoint": [],
        "command": bootstrap_command(preload),
        "user": SANDBOX_USER,
        "working_dir": WORKDIR,
        "environment": [
            f"HOME={WORKDIR}",
            f"TMPDIR={WORKDIR}/.pyexec/tmp",
            "PYTHONUNBUFFERED=1",
        ],
        "labels": {
            **labels(execution_id, owner),
            LABEL_PHASE: "run" if phase.run else "setup",
            **({LABEL_NONCE: nonce} if nonce else {}),
        },
        "stdin_open": True,
        "detach": False,  # with stdin_open: attach stdin/stdout/stderr, close stdin at EOF
        "tty": False,
        "host_config": host_config,
        # Engine fields ``create_host_config`` has no argument for, set as they are.
        "host_config_extra": {"MaskedPaths": list(MASKED_PATHS)},
    }


def volume_args(request: ExecutionRequest, execution_id: str, owner: str) -> dict[str, Any]:
    """Arguments of ``APIClient.create_volume`` for the /work a setup container hands over."""
    return {
        "driver": "local",
        "driver_opts": {"type": "tmpfs", "device": "tmpfs", "o": _work_options(request)},
        "labels": labels(execution_id, owner),
    }


def bootstrap_spec(
    settings: Settings,
    request: ExecutionRequest,
    phase: Phase,
    *,
    deps: str | None = None,
    nonce: str = "",
) -> dict[str, Any]:
    """What the in-container bootstrap is told to do (the first frame on its stdin);
    ``deps``: the key of the cached environment the program gets on its path;
    ``nonce`` marks the artifacts on its stdout when the request asks for some."""
    env = dict(request.env_vars)
    spec: dict[str, Any] = {
        "extract": phase.extract,
        "limits": {
            "max_entries": settings.max_tar_entries,
            "max_bytes": settings.max_extracted_bytes,
        },
    }
    if phase.setup:
        setup_env = dict(env)
        if settings.ca_bundle:
            for name in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
                setup_env[name] = CA_TARGET
        spec["setup"] = {
            "requirements": request.requirements_txt,
            "commands": list(request.pre_commands),
            "timeout": request.config.timeout_seconds,
            "env": setup_env,
            "max_output": request.config.max_output_bytes,
        }
    if phase.run:
        spec["run"] = {
            "entrypoint": request.entrypoint,
            "args": list(request.script_args),
            "env": env,
            # Wall-clock seconds whose CPU time (on every core) caps the program: it only
            # bites if this process dies and nobody enforces the timeout any more.
            "cpu_backstop": request.config.timeout_seconds + CPU_BACKSTOP_SLACK,
            # The wall-clock limit, enforced in the sandbox too (by the bootstrap, which
            # runs the program as its child): it holds if this process dies. A little
            # later than the runner's own, which normally acts first.
            "deadline": request.config.timeout_seconds + SANDBOX_DEADLINE_GRACE,
        }
        if deps:
            spec["run"]["deps"] = deps_path(deps)
        if request.artifacts:
            spec["run"]["artifacts"] = {
                "patterns": list(request.artifacts),
                "cap": request.config.max_artifact_bytes,
                "max_files": MAX_ARTIFACT_FILES,
                "nonce": nonce,
            }
    return spec


def artifact_grace(request: ExecutionRequest) -> float:
    """Seconds the runner waits past a run's timeout when it asks for artifacts: the
    bootstrap ends the program at its own deadline, then collects and sends them. At
    most ``ARTIFACT_GRACE_MAX``, well inside the slack the service allows every run
    (``pyexec.deadline``), so a large cap never makes the service give up first."""
    if not request.artifacts:
        return 0.0
    rate = request.config.max_artifact_bytes / ARTIFACT_RATE
    return min(SANDBOX_DEADLINE_GRACE + ARTIFACT_SECONDS + rate, ARTIFACT_GRACE_MAX)
