"""The Nomad runner jobs as data: a pure function from ``Settings`` to Nomad's API JSON.

One parameterized ``batch`` job is registered per resource class (Nomad cannot
interpolate ``resources`` per dispatch), named ``<nomad_job_prefix>-<class>``, and one
more per class for requests with requirements, ``<nomad_job_prefix>-<class>-pip``. With
``PYEXEC_SETUP_NETWORK=true`` two more per class, ``-setup`` and ``-pip-setup``, take
the requests with pre-commands (their ``setup`` task below).
Each dispatch carries the execution id (and optionally the image) in its meta.

The task group's tasks share the allocation directory ``/alloc``:

``install`` (prestart, ``-pip`` jobs only)
    the trusted installer: the operator's image (``PYEXEC_NOMAD_TRUSTED_IMAGE``), never
    the request's, with the network. Installs the record's requirements as wheels only
    (no package build script runs) into ``/alloc/data/pyexec/site``.
``setup`` (prestart, ``-setup`` jobs only, i.e. only with ``PYEXEC_SETUP_NETWORK=true``)
    the pre-commands with the network, in the request's image and otherwise the run
    task's sandbox (``bridge``, never the node's ``host`` network): unpacks the tar
    with the tar rules, waits for ``install`` if there is one, runs the pre-commands and
    leaves ``/work`` as a tar in ``/alloc/data/pyexec/setup``. The user's program never
    runs here: the run task unpacks that tar (tar rules again) into its own tmpfs.
``run`` (main)
    the sandbox, in the request's image: no network, read-only root, no capabilities,
    pids and memory limits, a tmpfs ``/work``. The Nomad client renders the tar, its
    manifest and the record from Consul into ``/local`` (the task holds no Consul
    token); the task checks and unpacks the tar with the API's tar rules, runs the
    pre-commands and the entrypoint, and writes capped output and its verdict into
    ``/alloc/data/pyexec``, where the service reads them (client filesystem API).
``finish`` (poststop)
    the record writer of a plain ``nomad job dispatch`` (trusted image, trusted code):
    stores the final record in Consul unless it is terminal already. The service's own
    dispatches store their record themselves and never wait for it.

The code in the tasks is the service's own: ``pyexec/taskscripts/nomad_run.py``,
``pyexec/sandbox/tarcheck.py`` and ``pyexec/taskscripts/nomad_finish.py``, shipped as
plain-text templates (unusual delimiters, so their source is never parsed as a Go
template); the key layout and the status of each reason reach the finish task as
environment built here from ``consul_keys`` and ``Reason``.
``jobs/pyexec-runner.nomad.hcl`` is the small class's job in HCL; a test keeps the two
in step.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
import urllib.parse
from importlib import resources
from typing import Any

from pyexec.deps import nomad as deps_nomad
from pyexec.errors import LimitExceeded
from pyexec.models import ExecutionConfig, Reason
from pyexec.runner.docker_spec import NOFILE
from pyexec.settings import MiB, ResourceClass, Settings, SettingsError
from pyexec.store import CHUNK_SIZE, consul_keys

__all__ = [
    "GROUP",
    "LEFT_DELIM",
    "RIGHT_DELIM",
    "TASKS",
    "TASK_FILES",
    "consul_url",
    "deps_prewarm_job",
    "job_id",
    "job_id_for",
    "pick_class",
    "pool_job",
    "pool_job_id",
    "pool_jobs",
    "requirement_problem",
    "runner_job",
    "runner_jobs",
    "service_jobs",
    "task_file",
    "task_network_mode",
]

GROUP = "pyexec"
#: Task names by role.
TASKS = {"install": "install", "setup": "setup", "run": "run", "finish": "finish"}
#: Suffix of the job ID of a class's variant with the requirements installer.
PIP_SUFFIX = "-pip"
#: Suffix of the job ID of a variant whose pre-commands get the network (setup task).
SETUP_SUFFIX = "-setup"
#: The docker network of the setup task: its own namespace, never the node's.
SETUP_NETWORK_MODE = "bridge"
#: Template delimiters nothing in Python source contains.
LEFT_DELIM = "[[[pyexec"
RIGHT_DELIM = "pyexec]]]"
#: The service's own modules each task runs, by destination in the task dir.
TASK_FILES = {
    "local/pyexec/nomad_run.py": "pyexec/taskscripts/nomad_run.py",
    "local/pyexec/tarcheck.py": "pyexec/sandbox/tarcheck.py",
    "local/pyexec/collect.py": "pyexec/sandbox/collect.py",
    "local/pyexec/nomad_finish.py": "pyexec/taskscripts/nomad_finish.py",
    "local/pyexec/nomad_install.py": "pyexec/taskscripts/nomad_install.py",
    "local/pyexec/cachedir.py": "pyexec/deps/cachedir.py",
    "local/pyexec/build_env.py": "pyexec/deps/build_env.py",
}

#: What the run task (and a setup task) runs: the task script, the tar rules, the collector.
RUN_CODE = ("local/pyexec/nomad_run.py", "local/pyexec/tarcheck.py", "local/pyexec/collect.py")
#: Where the Nomad client renders the inputs of the run task from Consul.
INPUTS = {
    "tar": "local/bundle.tar",
    "manifest": "local/manifest.json",
    "record": "local/record.json",
}
SECOND = 1_000_000_000  # Nomad durations are nanoseconds
#: Memory (MiB) and CPU (MHz) of the finish task; it only reads files and talks to Consul.
FINISH_MEMORY_MB = 128
FINISH_CPU_MHZ = 100
#: /tmp inside the sandbox, for libraries that insist on a temp dir.
TMP_BYTES = 64 * MiB
KILL_TIMEOUT_SECONDS = 5
CA_DEST = "local/ca-bundle.crt"
_OPERATORS = ("=", "!=", ">", ">=", "<", "<=", "regexp", "version", "semver", "set_contains")


def task_file(dest: str) -> str:
    """The source of one of the service's modules a task runs (``TASK_FILES``)."""
    package, _, name = TASK_FILES[dest].removesuffix(".py").rpartition("/")
    return (resources.files(package.replace("/", ".")) / f"{name}.py").read_text("utf-8")


def job_id(
    settings: Settings, resource_class: ResourceClass, *, pip: bool = False, setup: bool = False
) -> str:
    return (
        job_id_for(settings, resource_class.name)
        + (PIP_SUFFIX if pip else "")
        + (SETUP_SUFFIX if setup else "")
    )


def variants(settings: Settings) -> list[tuple[bool, bool]]:
    """The (pip, setup) job variants of each class: setup ones only when the operator
    gives pre-commands the network."""
    setups = (False, True) if settings.setup_network else (False,)
    return [(pip, setup) for setup in setups for pip in (False, True)]


def uses_setup_task(settings: Settings, pre_commands: tuple[str, ...] | list[str]) -> bool:
    """Whether a request's pre-commands run in a ``setup`` task with the network."""
    return settings.setup_network and bool(pre_commands)


def job_id_for(settings: Settings, class_name: str) -> str:
    """The runner job ID of the resource class called ``class_name``."""
    return f"{settings.nomad_job_prefix}-{class_name}"


def consul_url(settings: Settings) -> str:
    """The Consul HTTP address as the runner tasks reach it, as a URL."""
    addr = settings.nomad_consul_addr or settings.consul_addr or "127.0.0.1:8500"
    return addr if "://" in addr else f"http://{addr}"


def task_network_mode(settings: Settings) -> str:
    """The docker network of the trusted tasks (installer, writer; never of the run task).

    ``bridge``: the task gets its own network namespace on Docker's default bridge. It
    reaches Consul at a node address (``PYEXEC_NOMAD_CONSUL_ADDR``, e.g.
    ``http://${attr.unique.network.ip-address}:8500``) and the package index through
    NAT, but not the node's loopback services. A Consul the tasks reach on loopback
    leaves only ``host``.
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


def requirement_problem(line: str) -> str | None:
    """Why the wheels-only installer cannot install this requirements line, when that is
    known without the package index (``None``: it may be installable)."""
    text = line.split(" #", 1)[0].strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("-"):
        return "pip options are not accepted (editable installs, other files, indexes)"
    target = text.split("@", 1)[1].strip() if " @ " in text or "@ " in text else text
    if "://" in target or target.startswith((".", "/", "file:")):
        url = target.split(";", 1)[0].strip().split("#", 1)[0]
        if not url.endswith(".whl"):
            return "a URL or path that is not a wheel would be built from source"
    return None


def _constraint(spec: str) -> dict[str, str]:
    parts = shlex.split(spec)
    if len(parts) != 3 or parts[1] not in _OPERATORS:
        raise SettingsError(
            f"PYEXEC_NOMAD_CONSTRAINTS: expected `attribute operator value`, got {spec!r}",
            name="PYEXEC_NOMAD_CONSTRAINTS",
        )
    return {"LTarget": parts[0], "Operand": parts[1], "RTarget": parts[2]}


def _template(data: str, dest: str, *, literal: bool = True, env: bool = False) -> dict[str, Any]:
    template: dict[str, Any] = {
        "EmbeddedTmpl": data,
        "DestPath": dest,
        "ChangeMode": "noop",
        "Perms": "0644",
    }
    if literal:  # source code: delimiters it never contains, so nothing in it is an action
        template |= {"LeftDelim": LEFT_DELIM, "RightDelim": RIGHT_DELIM}
    if env:
        template["Envvars"] = True
    return template


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


#: Tasks an operator's template goes to unless it names others: the trusted ones only, so
#: nothing an operator renders (a pip.conf with credentials) reaches user code by default.
TEMPLATE_TASKS_DEFAULT = ("install", "finish")


def operator_templates(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """PYEXEC_NOMAD_TEMPLATES read and checked: the extra templates of each task."""
    path = settings.nomad_templates
    if not path:
        return {}
    name = "PYEXEC_NOMAD_TEMPLATES"
    try:
        with open(path, encoding="utf-8") as fh:
            entries = json.load(fh)
    except OSError as exc:
        raise SettingsError(f"{name}: cannot read {path}: {exc.strerror}", name=name) from None
    except ValueError as exc:
        raise SettingsError(f"{name}: {path} is not JSON: {exc}", name=name) from None
    if not isinstance(entries, list):
        raise SettingsError(f"{name}: {path} must hold a list of templates", name=name)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("DestPath"), str):
            raise SettingsError(f"{name}: every template needs a DestPath: {entry!r}", name=name)
        tasks = entry.get("Tasks", list(TEMPLATE_TASKS_DEFAULT))
        if not isinstance(tasks, list):
            raise SettingsError(f"{name}: Tasks must be a list of task names: {entry!r}", name=name)
        unknown = sorted(str(t) for t in set(map(str, tasks)) - set(TASKS))
        if unknown:
            raise SettingsError(f"{name}: unknown task(s) {unknown} in {entry!r}", name=name)
        template = {k: v for k, v in entry.items() if k != "Tasks"}
        for task in tasks:
            by_task.setdefault(task, []).append(template)
    return by_task


def _code(*dests: str) -> list[dict[str, Any]]:
    return [_template(task_file(dest), dest) for dest in dests]


def _key_path(key_of: Any, prefix: str, meta: str = "execution_id") -> str:
    """A Go template expression for the key ``key_of(prefix, <the dispatch's meta>)``."""
    pattern = key_of(prefix.replace("%", "%%"), "%s")
    return f'(printf {json.dumps(pattern)} (env "NOMAD_META_{meta}"))'


def _inputs_from(folder_of: Any, prefix: str, meta: str) -> list[dict[str, Any]]:
    """The run task's three inputs from the folder ``folder_of(prefix, <meta>)`` (laid out
    as an execution's: ``tar/``, ``manifest``, ``record``)."""
    tar_folder = _key_path(lambda p, i: folder_of(p, i) + "tar", prefix, meta)
    tar = f"{{{{ range ls {tar_folder} }}}}{{{{ .Value }}}}{{{{ end }}}}"
    templates = [_template(tar, INPUTS["tar"], literal=False)]
    for name in ("manifest", "record"):
        key = _key_path(lambda p, i, n=name: folder_of(p, i) + n, prefix, meta)
        templates.append(_template(f'{{{{ keyOrDefault {key} "" }}}}', INPUTS[name], literal=False))
    return templates


def input_templates(settings: Settings) -> list[dict[str, Any]]:
    """The run task's inputs, rendered by the Nomad client from Consul (its own access)."""
    return _inputs_from(consul_keys.execution_folder, settings.consul_prefix, "execution_id")


def writer_env(settings: Settings) -> dict[str, str]:
    """What the finish task must agree on with the service, from the service's definitions."""
    prefix, eid = settings.consul_prefix, "${NOMAD_META_execution_id}"
    return {
        "PYEXEC_CONSUL_ADDR": consul_url(settings),
        "PYEXEC_RECORD_KEY": consul_keys.record_key(prefix, eid),
        "PYEXEC_STATUS_KEY": consul_keys.status_key(prefix, eid),
        "PYEXEC_STATUS_MARKER_KEY": consul_keys.status_marker_key(prefix, eid, ""),
        "PYEXEC_MANIFEST_KEY": consul_keys.manifest_key(prefix, eid),
        "PYEXEC_TAR_FOLDER": consul_keys.execution_folder(prefix, eid) + "tar/",
        "PYEXEC_OUTPUT_FOLDER": consul_keys.execution_folder(prefix, eid) + "output/",
        "PYEXEC_ARTIFACTS_FOLDER": consul_keys.artifacts_folder(prefix, eid),
        "PYEXEC_STATUS_OF": json.dumps({r.value: r.status.value for r in Reason}),
        "PYEXEC_INLINE_OUTPUT_BYTES": str(consul_keys.INLINE_OUTPUT_BYTES),
        "PYEXEC_OUTPUT_CHUNK_BYTES": str(CHUNK_SIZE),
    }


def _token_template(settings: Settings) -> dict[str, Any] | None:
    """CONSUL_HTTP_TOKEN for the writer from a Nomad variable; none while it does not exist
    (``nomadVar`` alone would block the task until it does)."""
    path = settings.nomad_consul_token_variable
    if not path:
        return None
    quoted = json.dumps(path)
    data = (
        f"{{{{ range nomadVarList {quoted} }}}}{{{{ if eq .Path {quoted} }}}}"
        f"{{{{ with nomadVar .Path }}}}CONSUL_HTTP_TOKEN={{{{ .consul_token }}}}{{{{ end }}}}"
        "{{ end }}{{ end }}\n"
    )
    return _template(data, "secrets/consul.env", literal=False, env=True)


def _task(
    name: str,
    hook: str | None,
    image: str,
    args: list[str],
    config: dict[str, Any],
    cpu: int,
    memory_mb: int,
    env: dict[str, str],
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "Name": name,
        "Driver": "docker",
        "User": "1000",
        "Config": {
            "image": image,
            **({"command": "python3", "args": args} if args else {}),
            **config,
        },
        "Env": env,
        "Templates": [],
        "Resources": {"CPU": cpu, "MemoryMB": memory_mb},
        "KillTimeout": KILL_TIMEOUT_SECONDS * SECOND,
    }
    if hook is not None:
        task["Lifecycle"] = {"Hook": hook, "Sidecar": False}
    return task


def _tmpfs(target: str, size: int) -> dict[str, Any]:
    return {"type": "tmpfs", "target": target, "readonly": False, "tmpfs_options": {"size": size}}


def _add_ca_bundle(settings: Settings, task: dict[str, Any]) -> None:
    """PYEXEC_CA_BUNDLE for a trusted task that reaches the package index."""
    ca = _ca_bundle(settings)
    if ca is not None:
        task["Templates"].append(_template(ca, CA_DEST))
        for var in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
            task["Env"][var] = f"/{CA_DEST}"


def runner_job(
    settings: Settings, resource_class: ResourceClass, *, pip: bool = False, setup: bool = False
) -> dict[str, Any]:
    """The runner job of one resource class, as the body of ``PUT /v1/jobs`` wants ``Job``.

    ``pip``: the variant with the trusted requirements installer before the run task.
    ``setup``: the variant whose pre-commands run in a ``setup`` task with the network.
    """
    extra_env = dict(settings.nomad_task_env)
    trusted_image = settings.nomad_trusted_image or settings.default_image
    trusted = {
        "network_mode": task_network_mode(settings),
        "readonly_rootfs": True,
        "cap_drop": ["all"],
        "security_opt": ["no-new-privileges"],
        "mount": [_tmpfs("/tmp", TMP_BYTES)],
    }
    sandbox: dict[str, Any] = {
        # The image's own ENTRYPOINT (a wrapper script) never runs: this replaces it.
        "entrypoint": ["python3", "-I", "-S", "/local/pyexec/nomad_run.py"],
        "network_mode": "none",
        "runtime": settings.docker_runtime,
        "readonly_rootfs": True,
        "cap_drop": ["all"],
        # The local runner's seccomp profile (no ptrace, process_vm_*, personality...):
        # the driver reads it from a path on the client (checked on Nomad 1.6.5).
        "security_opt": ["no-new-privileges"]
        + ([f"seccomp={settings.nomad_seccomp_profile}"] if settings.nomad_seccomp_profile else []),
        "pids_limit": settings.default_pids_limit,
        "ulimit": [{"nofile": f"{NOFILE}:{NOFILE}"}],
        "mount": [_tmpfs("/work", resource_class.disk_mb * MiB), _tmpfs("/tmp", TMP_BYTES)],
    }
    run = _task(
        TASKS["run"],
        None,
        "${NOMAD_META_image}",
        [],
        sandbox,
        resource_class.cpu_mhz,
        resource_class.memory_mb,
        {
            "PYEXEC_MAX_TAR_ENTRIES": str(settings.max_tar_entries),
            "PYEXEC_MAX_EXTRACTED_BYTES": str(settings.max_extracted_bytes),
            **extra_env,
        },
    )
    run["Templates"] = [
        *_code(*RUN_CODE),
        *input_templates(settings),
    ]
    setup_task = None
    if setup:
        setup_task = _task(
            TASKS["setup"],
            "prestart",
            "${NOMAD_META_image}",
            [],
            {**sandbox, "network_mode": SETUP_NETWORK_MODE},
            resource_class.cpu_mhz,
            resource_class.memory_mb,
            {
                **run["Env"],
                "PYEXEC_PHASE": "setup",
                **({"PYEXEC_WAIT_INSTALL": "1"} if pip else {}),
            },
        )
        setup_task["Templates"] = list(run["Templates"])
        # The run task only needs the record now: its /work comes from the setup task.
        run["Env"] = {
            **run["Env"],
            "PYEXEC_PHASE": "run",
            "PYEXEC_WORK_BYTES": str(resource_class.disk_mb * MiB),
        }
        run["Templates"] = [
            *_code(*RUN_CODE),
            input_templates(settings)[2],
        ]

    finish = _task(
        TASKS["finish"],
        "poststop",
        trusted_image,
        ["-I", "/local/pyexec/nomad_finish.py"],
        dict(trusted),
        FINISH_CPU_MHZ,
        FINISH_MEMORY_MB,
        {**writer_env(settings), **extra_env},
    )
    finish["Templates"] = _code(
        "local/pyexec/nomad_finish.py", "local/pyexec/tarcheck.py", "local/pyexec/collect.py"
    )
    token = _token_template(settings)
    if token is not None:
        finish["Templates"].append(token)

    extra_templates = operator_templates(settings)
    run["Templates"] += extra_templates.get("run", [])
    finish["Templates"] += extra_templates.get("finish", [])
    tasks = [run, finish]
    if setup_task is not None:
        setup_task["Templates"] += extra_templates.get("setup", [])
        tasks.insert(0, setup_task)
    if pip:
        install = _task(
            TASKS["install"],
            "prestart",
            trusted_image,
            ["-I", "/local/pyexec/nomad_install.py"],
            dict(trusted),
            resource_class.cpu_mhz,
            resource_class.memory_mb,
            {"PYEXEC_PIP_ONLY_BINARY": ":all:", **extra_env},
        )
        install["Templates"] = [
            *_code("local/pyexec/nomad_install.py"),
            input_templates(settings)[2],
        ]
        _add_ca_bundle(settings, install)
        install["Templates"] += extra_templates.get("install", [])
        tasks.insert(0, install)
        if deps_nomad.enabled(settings):
            # The node's dependency cache: written by the trusted installer only.
            install["VolumeMounts"] = deps_nomad.mounts(writable=True)
            run["VolumeMounts"] = deps_nomad.mounts(writable=False)
            install["Templates"][1:1] = _code(*deps_nomad.INSTALLER_CODE)
            install["Env"].update(deps_nomad.installer_env(settings))

    job: dict[str, Any] = {
        "ID": job_id(settings, resource_class, pip=pip, setup=setup),
        "Name": job_id(settings, resource_class, pip=pip, setup=setup),
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
                "Tasks": tasks,
            }
        ],
    }
    if pip and deps_nomad.enabled(settings):
        job["TaskGroups"][0]["Volumes"] = deps_nomad.volumes(settings)
    if settings.nomad_namespace:
        job["Namespace"] = settings.nomad_namespace
    if settings.nomad_region:
        job["Region"] = settings.nomad_region
    if settings.nomad_node_pool:
        job["NodePool"] = settings.nomad_node_pool
    return job


def runner_jobs(settings: Settings) -> list[dict[str, Any]]:
    """Per resource class, smallest first: the job, then its requirements variant (then,
    with ``PYEXEC_SETUP_NETWORK=true``, the two with a setup task)."""
    return [
        runner_job(settings, c, pip=pip, setup=setup)
        for c in settings.nomad_resource_classes
        for pip, setup in variants(settings)
    ]


#: Suffix of the job ID of a class's warm-pool job (``pyexec.runner.nomad_pool``).
POOL_SUFFIX = "-pool"
#: A pool slot's run task gives up waiting for its assignment this long after the idle
#: limit (the service replaces it at the limit; this bounds what a dead service leaves).
POOL_WAIT_MARGIN_SECONDS = 60


def pool_job_id(settings: Settings, resource_class: ResourceClass) -> str:
    return job_id_for(settings, resource_class.name) + POOL_SUFFIX


def pool_wait_seconds(settings: Settings) -> int:
    """How long a slot's run task waits for its assignment before it exits unused."""
    return int(settings.pool_max_idle_seconds) + POOL_WAIT_MARGIN_SECONDS


def pool_job(settings: Settings, resource_class: ResourceClass) -> dict[str, Any]:
    """The warm-pool job of one resource class: the class's runner job (same sandbox,
    same code), dispatched ahead of time per slot (meta ``slot``). Its run task starts
    with empty inputs and waits for them: the Nomad client renders them from the slot's
    folder in Consul (``consul_keys.pool_inputs_folder``) when the service claims the
    slot for an execution, then runs it as a cold run task would. No ``finish`` task:
    the service writes a pooled run's record itself; a plain ``nomad job dispatch`` uses
    the runner job, which is unchanged."""
    job = runner_job(settings, resource_class)
    name = pool_job_id(settings, resource_class)
    group = job["TaskGroups"][0]
    run = next(t for t in group["Tasks"] if t["Name"] == TASKS["run"])
    group["Tasks"] = [run]
    pooled = _inputs_from(consul_keys.pool_inputs_folder, settings.consul_prefix, "slot")
    by_dest = {t["DestPath"]: t for t in pooled}
    run["Templates"] = [by_dest.get(t["DestPath"], t) for t in run["Templates"]]
    run["Env"] = {**run["Env"], "PYEXEC_POOL_WAIT_SECONDS": "${NOMAD_META_wait}"}
    job |= {
        "ID": name,
        "Name": name,
        "ParameterizedJob": {
            "Payload": "forbidden",
            "MetaRequired": ["slot"],
            "MetaOptional": ["image", "owner", "wait"],
        },
        "Meta": {
            "image": settings.default_image,
            "owner": "",
            "wait": str(pool_wait_seconds(settings)),
            "pyexec_class": resource_class.name,
        },
    }
    return job


def pool_jobs(settings: Settings) -> list[dict[str, Any]]:
    """The warm-pool job of each resource class."""
    return [pool_job(settings, c) for c in settings.nomad_resource_classes]


def service_jobs(settings: Settings) -> list[dict[str, Any]]:
    """Every job the service uses as ``settings`` configure it: the runner jobs, the
    warm-pool jobs when images are pooled, the dependency prewarm job when sets are
    configured (what ``pyexec job render|register`` cover, and start-up registers)."""
    jobs = runner_jobs(settings)
    if settings.pooled_images:
        jobs += pool_jobs(settings)
    prewarm = deps_prewarm_job(settings)
    if prewarm is not None:
        jobs.append(prewarm)
    return jobs


def deps_prewarm_job(settings: Settings) -> dict[str, Any] | None:
    """The job that builds PYEXEC_DEPS_PREWARM's sets into every node's dependency cache:
    a parameterized ``sysbatch`` job (each dispatch runs once on every eligible node, the
    nodes with the host volume) whose one task is the trusted installer in prewarm mode.
    ``None`` when the cache or the sets are not configured."""
    if not (deps_nomad.enabled(settings) and settings.deps_prewarm):
        return None
    trusted_image = settings.nomad_trusted_image or settings.default_image
    smallest = settings.nomad_resource_classes[0]
    install = _task(
        TASKS["install"],
        None,
        trusted_image,
        ["-I", "/local/pyexec/nomad_install.py"],
        {
            "network_mode": task_network_mode(settings),
            "readonly_rootfs": True,
            "cap_drop": ["all"],
            "security_opt": ["no-new-privileges"],
            "mount": [_tmpfs("/tmp", TMP_BYTES)],
        },
        smallest.cpu_mhz,
        max(smallest.memory_mb, deps_nomad.PREWARM_MEMORY_MB),
        {
            "PYEXEC_PIP_ONLY_BINARY": ":all:",
            **dict(settings.nomad_task_env),
            **deps_nomad.installer_env(settings),
            deps_nomad.PREWARM_ENV: json.dumps([list(s) for s in settings.deps_prewarm]),
        },
    )
    install["Templates"] = _code("local/pyexec/nomad_install.py", *deps_nomad.INSTALLER_CODE)
    _add_ca_bundle(settings, install)
    install["Templates"] += operator_templates(settings).get("install", [])
    install["VolumeMounts"] = deps_nomad.mounts(writable=True)
    prewarm_id = f"{settings.nomad_job_prefix}{deps_nomad.PREWARM_SUFFIX}"
    job: dict[str, Any] = {
        "ID": prewarm_id,
        "Name": prewarm_id,
        "Type": "sysbatch",
        "Datacenters": list(settings.nomad_datacenters),
        "ParameterizedJob": {"Payload": "forbidden"},
        "Constraints": [_constraint(c) for c in settings.nomad_constraints],
        "TaskGroups": [
            {
                "Name": GROUP,
                "Count": 1,
                "Volumes": deps_nomad.volumes(settings),
                "RestartPolicy": {
                    "Attempts": 0,
                    "Interval": 24 * 3600 * SECOND,
                    "Delay": 15 * SECOND,
                    "Mode": "fail",
                },
                "Tasks": [install],
            }
        ],
    }
    for key, value in (
        ("Namespace", settings.nomad_namespace),
        ("Region", settings.nomad_region),
        ("NodePool", settings.nomad_node_pool),
    ):
        if value:
            job[key] = value
    return job
