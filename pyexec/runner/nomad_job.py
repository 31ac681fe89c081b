"""The Nomad runner jobs as data: a pure function from ``Settings`` to Nomad's API JSON.

One parameterized ``batch`` job is registered per resource class (Nomad cannot
interpolate ``resources`` per dispatch), named ``<nomad_job_prefix>-<class>``.
Each dispatch carries the execution id (and optionally the image) in its meta;
everything else about the run is read from the execution's record in Consul.

The task group has three tasks sharing the allocation directory ``/alloc``:

``setup`` (prestart)
    fetches the tar from Consul, verifies and extracts it, installs requirements and
    runs the pre-commands. It needs the network (Consul, the package index).
``run`` (main)
    the sandbox: no network, read-only root, no capabilities, pids and memory limits,
    a tmpfs ``/work``. Runs the entrypoint and records its verdict in ``/alloc``.
``finish`` (poststop)
    writes the final record to Consul (check-and-set: a terminal record is never
    overwritten) and prints the verdict, which the service reads through the logs API.

All three run ``pyexec/taskscripts/pyexec_task.py``, shipped as a plain-text template
(unusual delimiters, so the Python source is never parsed as a Go template).
``jobs/pyexec-runner.nomad.hcl`` is the same job in HCL; a test keeps the two in step.
"""

from __future__ import annotations

import ipaddress
import shlex
import urllib.parse
from importlib import resources
from typing import Any

from pyexec.errors import LimitExceeded
from pyexec.models import ExecutionConfig
from pyexec.settings import MiB, ResourceClass, Settings, SettingsError

__all__ = [
    "GROUP",
    "LEFT_DELIM",
    "RIGHT_DELIM",
    "TASKS",
    "consul_url",
    "job_id",
    "job_id_for",
    "pick_class",
    "runner_job",
    "runner_jobs",
    "task_network_mode",
    "task_script",
]

GROUP = "pyexec"
#: Task names by lifecycle role.
TASKS = {"setup": "setup", "run": "run", "finish": "finish"}
#: Template delimiters nothing in Python source (or a CA bundle) contains.
LEFT_DELIM = "[[[pyexec"
RIGHT_DELIM = "pyexec]]]"
SCRIPT_DEST = "local/pyexec_task.py"
CA_DEST = "local/ca-bundle.crt"
SECOND = 1_000_000_000  # Nomad durations are nanoseconds
#: Memory (MiB) and CPU (MHz) of the finish task; it only reads files and talks to Consul.
FINISH_MEMORY_MB = 128
FINISH_CPU_MHZ = 100
#: /tmp inside the sandbox, for libraries that insist on a temp dir.
TMP_BYTES = 64 * MiB
KILL_TIMEOUT_SECONDS = 5
_OPERATORS = ("=", "!=", ">", ">=", "<", "<=", "regexp", "version", "semver", "set_contains")


def task_script() -> str:
    """The source of the script every runner task runs (stdlib only)."""
    return (resources.files("pyexec.taskscripts") / "pyexec_task.py").read_text("utf-8")


def job_id(settings: Settings, resource_class: ResourceClass) -> str:
    return job_id_for(settings, resource_class.name)


def job_id_for(settings: Settings, class_name: str) -> str:
    """The runner job ID of the resource class called ``class_name``."""
    return f"{settings.nomad_job_prefix}-{class_name}"


def consul_url(settings: Settings) -> str:
    """The Consul HTTP address as the runner tasks reach it, as a URL."""
    addr = settings.nomad_consul_addr or settings.consul_addr or "127.0.0.1:8500"
    return addr if "://" in addr else f"http://{addr}"


def task_network_mode(settings: Settings) -> str:
    """The docker network of the setup and finish tasks (never of the run task).

    ``bridge``: the task gets its own network namespace on Docker's default bridge. It
    reaches Consul at a node address (``PYEXEC_NOMAD_CONSUL_ADDR``, e.g.
    ``http://${attr.unique.network.ip-address}:8500``) and the package index through
    NAT, but not the node's loopback services nor its abstract unix sockets, which
    ``host`` would hand to requirements' build scripts and pre-commands. A Consul the
    tasks reach on loopback leaves only ``host``.
    """
    host = urllib.parse.urlsplit(consul_url(settings)).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return "host" if loopback else "bridge"


def pick_class(settings: Settings, config: ExecutionConfig) -> ResourceClass:
    """The smallest resource class that fits ``config``; ``LimitExceeded`` if none does."""
    if config.pids_limit > settings.default_pids_limit:
        raise LimitExceeded(
            f"config.pids_limit={config.pids_limit} exceeds the runner jobs' limit of "
            f"{settings.default_pids_limit}",
            code="no_resource_class",
            field="config.pids_limit",
            maximum=settings.default_pids_limit,
        )
    for candidate in sorted(
        settings.nomad_resource_classes, key=lambda c: (c.memory_mb, c.disk_mb, c.cpu_mhz)
    ):
        if candidate.memory_mb >= config.memory_mb and candidate.disk_mb >= config.disk_mb:
            return candidate
    offered = ", ".join(
        f"{c.name} ({c.memory_mb} MiB memory, {c.disk_mb} MiB disk)"
        for c in settings.nomad_resource_classes
    )
    raise LimitExceeded(
        f"no resource class fits memory_mb={config.memory_mb} and disk_mb={config.disk_mb}; "
        f"classes: {offered or 'none'}",
        code="no_resource_class",
        field="config.memory_mb",
    )


def _constraint(spec: str) -> dict[str, str]:
    parts = shlex.split(spec)
    if len(parts) != 3 or parts[1] not in _OPERATORS:
        raise SettingsError(
            f"PYEXEC_NOMAD_CONSTRAINTS: expected `attribute operator value`, got {spec!r}",
            name="PYEXEC_NOMAD_CONSTRAINTS",
        )
    return {"LTarget": parts[0], "Operand": parts[1], "RTarget": parts[2]}


def _template(data: str, dest: str) -> dict[str, Any]:
    return {
        "EmbeddedTmpl": data,
        "DestPath": dest,
        "ChangeMode": "noop",
        "Perms": "0644",
        "LeftDelim": LEFT_DELIM,
        "RightDelim": RIGHT_DELIM,
    }


def _ca_bundle(settings: Settings) -> str | None:
    if not settings.ca_bundle:
        return None
    try:
        with open(settings.ca_bundle, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise SettingsError(
            f"PYEXEC_CA_BUNDLE: cannot read {settings.ca_bundle}: {exc.strerror}",
            name="PYEXEC_CA_BUNDLE",
        ) from None


def _task(
    name: str, hook: str | None, config: dict[str, Any], cpu: int, memory_mb: int
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "Name": name,
        "Driver": "docker",
        "User": "1000",
        "Config": {
            "image": "${NOMAD_META_image}",
            "command": "python3",
            "args": [f"/{SCRIPT_DEST}", name],
            **config,
        },
        "Env": {},
        "Templates": [],
        "Resources": {"CPU": cpu, "MemoryMB": memory_mb},
        "KillTimeout": KILL_TIMEOUT_SECONDS * SECOND,
    }
    if hook is not None:
        task["Lifecycle"] = {"Hook": hook, "Sidecar": False}
    return task


def runner_job(settings: Settings, resource_class: ResourceClass) -> dict[str, Any]:
    """The runner job of one resource class, as the body of ``PUT /v1/jobs`` wants ``Job``."""
    script = task_script()
    consul_env = {
        "PYEXEC_CONSUL_ADDR": consul_url(settings),
        "PYEXEC_CONSUL_PREFIX": settings.consul_prefix,
    }
    # setup and finish talk to Consul (and setup to the package index); they run the
    # same image as the sandbox, but nothing of the user's runs in finish.
    networked = {
        "network_mode": task_network_mode(settings),
        "readonly_rootfs": True,
        "cap_drop": ["all"],
        "security_opt": ["no-new-privileges"],
        "mount": [_tmpfs("/tmp", TMP_BYTES)],
    }

    setup = _task(
        TASKS["setup"],
        "prestart",
        dict(networked),
        resource_class.cpu_mhz,
        resource_class.memory_mb,
    )
    setup["Env"] = dict(consul_env)
    setup["Templates"] = [_template(script, SCRIPT_DEST)]
    ca = _ca_bundle(settings)
    if ca is not None:
        setup["Templates"].append(_template(ca, CA_DEST))
        for var in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
            setup["Env"][var] = f"/{CA_DEST}"

    run = _task(
        TASKS["run"],
        None,
        {
            "network_mode": "none",
            "readonly_rootfs": True,
            "cap_drop": ["all"],
            "security_opt": ["no-new-privileges"],
            "pids_limit": settings.default_pids_limit,
            "mount": [
                _tmpfs("/work", resource_class.disk_mb * MiB),
                _tmpfs("/tmp", TMP_BYTES),
            ],
        },
        resource_class.cpu_mhz,
        resource_class.memory_mb,
    )
    run["Templates"] = [_template(script, SCRIPT_DEST)]

    finish = _task(TASKS["finish"], "poststop", dict(networked), FINISH_CPU_MHZ, FINISH_MEMORY_MB)
    finish["Env"] = dict(consul_env)
    finish["Templates"] = [_template(script, SCRIPT_DEST)]

    job: dict[str, Any] = {
        "ID": job_id(settings, resource_class),
        "Name": job_id(settings, resource_class),
        "Type": "batch",
        "Datacenters": list(settings.nomad_datacenters),
        "ParameterizedJob": {
            "Payload": "forbidden",
            "MetaRequired": ["execution_id"],
            "MetaOptional": ["image", "result_writer"],
        },
        # Defaults for the optional dispatch meta, and the class for operators to read.
        # result_writer: who stores the final record. A plain dispatch leaves it to the
        # finish task; the service dispatches with "service" and stores it itself (its
        # record carries post-processing, e.g. the eval API's result).
        "Meta": {
            "image": settings.default_image,
            "result_writer": "finish",
            "pyexec_class": resource_class.name,
        },
        "Constraints": [_constraint(c) for c in settings.nomad_constraints],
        "TaskGroups": [
            {
                "Name": GROUP,
                "Count": 1,
                # Code must never run twice: no restart, no reschedule.
                "RestartPolicy": {
                    "Attempts": 0,
                    "Interval": 24 * 3600 * SECOND,
                    "Delay": 15 * SECOND,
                    "Mode": "fail",
                },
                "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                "EphemeralDisk": {"SizeMB": resource_class.disk_mb},
                "Tasks": [setup, run, finish],
            }
        ],
    }
    if settings.nomad_namespace:
        job["Namespace"] = settings.nomad_namespace
    if settings.nomad_region:
        job["Region"] = settings.nomad_region
    if settings.nomad_node_pool:
        job["NodePool"] = settings.nomad_node_pool
    return job


def _tmpfs(target: str, size: int) -> dict[str, Any]:
    return {"type": "tmpfs", "target": target, "readonly": False, "tmpfs_options": {"size": size}}


def runner_jobs(settings: Settings) -> list[dict[str, Any]]:
    """One runner job per resource class, smallest first."""
    return [runner_job(settings, c) for c in settings.nomad_resource_classes]
