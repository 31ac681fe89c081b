"""Translate a docker task's Nomad ``config`` into docker SDK ``containers.create`` arguments.

Source: ``drivers/docker/config.go`` (``taskConfigSpec``: the option names) and
``drivers/docker/driver.go`` (``createContainerConfig``: how they map onto the
container, ``memoryLimits``, ``MemorySwap = memory``, cpu shares). Options the
docker driver knows but the sim does not carry out fail the task loudly rather
than being ignored, so a test never passes on a setting that had no effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker.types

__all__ = ["ConfigError", "container_kwargs"]

JSON = dict[str, Any]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Top-level names of drivers/docker/config.go taskConfigSpec.
KNOWN = _words(
    "image args auth auth_soft_fail cap_add cap_drop cgroupns command cpuset_cpus "
    "cpu_hard_limit cpu_cfs_period container_exists_attempts devices dns_search_domains "
    "dns_options dns_servers entrypoint extra_hosts force_pull group_add healthchecks "
    "hostname init interactive ipc_mode isolation labels load logging mac_address "
    "memory_hard_limit mount mounts network_aliases network_mode oom_score_adj runtime "
    "pids_limit pid_mode ports port_map privileged image_pull_timeout readonly_rootfs "
    "security_opt shm_size storage_opt sysctl tty ulimit uts_mode userns_mode volumes "
    "volume_driver work_dir"
)
# Known options the sim carries out; any other known option is refused.
DONE = _words(
    "image args command entrypoint cap_add cap_drop dns_servers extra_hosts force_pull "
    "hostname init image_pull_timeout labels memory_hard_limit mount network_mode "
    "oom_score_adj pids_limit readonly_rootfs runtime security_opt shm_size sysctl ulimit "
    "work_dir auth_soft_fail"
)
MiB = 1024 * 1024


class ConfigError(Exception):
    """The task config cannot be run: unknown option, or one the sim does not simulate."""


def blocks(value: Any) -> list[JSON]:
    """An HCL block arrives as an object or a list of objects in API JSON."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [value]
    return [v for v in value if isinstance(v, dict)]


def _merged(value: Any) -> JSON:
    out: JSON = {}
    for item in blocks(value):
        out |= item
    return out


def _mounts(cfg: JSON, alloc_dir: Path, task_dir: Path) -> list[docker.types.Mount]:
    mounts = [
        docker.types.Mount("/alloc", str(alloc_dir), type="bind"),
        docker.types.Mount("/local", str(task_dir / "local"), type="bind"),
        docker.types.Mount("/secrets", str(task_dir / "secrets"), type="bind"),
    ]
    for m in blocks(cfg.get("mount")):
        kind = m.get("type", "volume")
        if kind != "tmpfs":
            raise ConfigError(f"nomadsim: only tmpfs mounts are simulated, not {kind!r}")
        opts = _merged(m.get("tmpfs_options"))
        mounts.append(
            docker.types.Mount(
                m["target"],
                None,
                type="tmpfs",
                read_only=bool(m.get("readonly", False)),
                tmpfs_size=opts.get("size"),
                tmpfs_mode=opts.get("mode"),
            )
        )
    return mounts


def _security_opts(options: list[str] | None) -> list[str]:
    """``parseSecurityOpts`` (drivers/docker/driver.go, checked on Nomad 1.6.5): a
    ``seccomp=`` value is a *path on the client*, whose file the driver reads and hands
    to the engine; anything else goes through as it is."""
    out = []
    for option in options or []:
        name, sep, value = option.partition("=")
        if name == "seccomp" and sep and value != "unconfined":
            try:
                value = Path(value).read_text()
            except OSError as exc:
                raise ConfigError(
                    "failed to parse security_opt configuration: opening seccomp profile "
                    f"({value}) failed: open {value}: {exc.strerror.lower()}"
                ) from None
            option = f"seccomp={value}"
        out.append(option)
    return out


def container_kwargs(
    task: JSON, cfg: JSON, env: dict[str, str], alloc_dir: Path, task_dir: Path
) -> JSON:
    """``containers.create`` keyword arguments for one (interpolated) task config."""
    unknown = sorted(set(cfg) - KNOWN)
    if unknown:
        # guessed: wording of the hcl decode error the client reports.
        raise ConfigError(f'failed to decode driver config: Unsupported argument: "{unknown[0]}"')
    unsimulated = sorted(k for k in set(cfg) - DONE if cfg[k] not in (None, "", [], {}, False))
    if unsimulated:
        raise ConfigError(f"nomadsim: docker option {unsimulated[0]!r} is not simulated")
    if not cfg.get("image"):
        raise ConfigError("image must be specified")  # guessed: wording
    res = task.get("Resources") or {}
    mem_mb = int(res.get("MemoryMB") or 0)
    high_mb = max(int(res.get("MemoryMaxMB") or 0), int(cfg.get("memory_hard_limit") or 0))
    limit_mb = high_mb or mem_mb
    command: list[str] | None = None
    if cfg.get("command"):
        command = [cfg["command"], *(cfg.get("args") or [])]
    elif cfg.get("args"):
        command = list(cfg["args"])
    kwargs: JSON = {
        "image": cfg["image"],
        "command": command,
        "environment": env,
        "detach": True,
        "network_mode": cfg.get("network_mode") or "bridge",
        "read_only": bool(cfg.get("readonly_rootfs", False)),
        "cap_drop": cfg.get("cap_drop") or None,
        "cap_add": cfg.get("cap_add") or None,
        "security_opt": _security_opts(cfg.get("security_opt")) or None,
        "runtime": cfg.get("runtime") or None,
        "pids_limit": int(cfg["pids_limit"]) if cfg.get("pids_limit") else None,
        "mounts": _mounts(cfg, alloc_dir, task_dir),
        "working_dir": cfg.get("work_dir") or None,
        "user": task.get("User") or None,
        "mem_limit": limit_mb * MiB if limit_mb else None,
        "memswap_limit": limit_mb * MiB if limit_mb else None,
        "mem_reservation": mem_mb * MiB if high_mb else None,
        "cpu_shares": max(int(res.get("CPU") or 0), 2),
        "init": bool(cfg.get("init", False)) or None,
        "hostname": cfg.get("hostname") or None,
        "dns": cfg.get("dns_servers") or None,
        "extra_hosts": dict(h.split(":", 1) for h in cfg.get("extra_hosts") or []) or None,
        "oom_score_adj": cfg.get("oom_score_adj") or None,
        "shm_size": cfg.get("shm_size") or None,
        "sysctls": _merged(cfg.get("sysctl")) or None,
        "ulimits": [
            docker.types.Ulimit(
                name=name,
                soft=int(str(v).split(":")[0]),
                hard=int(str(v).split(":")[-1]),
            )
            for name, v in _merged(cfg.get("ulimit")).items()
        ]
        or None,
    }
    if cfg.get("entrypoint"):
        kwargs["entrypoint"] = cfg["entrypoint"]
    return {k: v for k, v in kwargs.items() if v is not None or k == "command"}
