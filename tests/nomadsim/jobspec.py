"""Pure functions over Nomad API job JSON: defaults, dispatch checks, env, interpolation.

Sources: ``api/jobs.go`` / ``api/tasks.go`` (canonical defaults),
``nomad/job_endpoint.go`` (``validateDispatchRequest``, dispatch errors),
``nomad/structs/structs.go`` (``DispatchedID``), ``client/taskenv/env.go``
(task environment, meta variables, ``${...}`` interpolation).
"""

from __future__ import annotations

import fnmatch
import re
import secrets
import time
from typing import Any

__all__ = [
    "DISPATCH_PAYLOAD_LIMIT",
    "DispatchError",
    "canonicalize",
    "datacenter_matches",
    "dispatched_id",
    "failed_constraints",
    "group_demand",
    "interpolate",
    "lifecycle_of",
    "task_env",
    "validate_dispatch",
]

JSON = dict[str, Any]

# nomad/job_endpoint.go: DispatchPayloadSizeLimit = 16 * 1024
DISPATCH_PAYLOAD_LIMIT = 16 * 1024
SECOND_NS = 1_000_000_000
HOUR_NS = 3600 * SECOND_NS


class DispatchError(Exception):
    """A dispatch refused by the server; Nomad answers these as HTTP 500 with the text."""


def _go_list(items: list[str]) -> str:
    """How Go's ``%v`` prints a []string: ``[a b]``."""
    return "[" + " ".join(items) + "]"


def canonicalize(job: JSON) -> JSON:
    """Fill the defaults Nomad's ``Job.Canonicalize`` (api/jobs.go, api/tasks.go) adds."""
    job.setdefault("Name", job["ID"])
    job.setdefault("Namespace", "default")
    job.setdefault("Region", "global")
    job.setdefault("Type", "service")
    job.setdefault("Priority", 50)
    job.setdefault("Datacenters", ["*"])
    job.setdefault("NodePool", "default")
    job.setdefault("Meta", None)
    job.setdefault("ParentID", "")
    job.setdefault("Dispatched", False)
    job.setdefault("Stop", False)
    job.setdefault("Version", 0)
    job.setdefault("Constraints", None)
    for group in job.get("TaskGroups") or []:
        group.setdefault("Count", 1)
        group.setdefault("Meta", None)
        batch = job["Type"] in ("batch", "sysbatch")
        # api/tasks.go: batch restart default is 3 attempts / 24h / 15s delay, mode fail.
        restart = {"Attempts": 3, "Interval": 24 * HOUR_NS, "Delay": 15 * SECOND_NS, "Mode": "fail"}
        if not batch:
            restart = {
                "Attempts": 2,
                "Interval": 1800 * SECOND_NS,
                "Delay": 15 * SECOND_NS,
                "Mode": "fail",
            }
        group["RestartPolicy"] = {**restart, **(group.get("RestartPolicy") or {})}
        # api/tasks.go NewDefaultReschedulePolicy("batch").
        resched = {
            "Attempts": 1,
            "Interval": 24 * HOUR_NS,
            "Delay": 5 * SECOND_NS,
            "DelayFunction": "constant",
            "MaxDelay": 0,
            "Unlimited": False,
        }
        group["ReschedulePolicy"] = {**resched, **(group.get("ReschedulePolicy") or {})}
        group.setdefault("EphemeralDisk", {"Sticky": False, "Migrate": False, "SizeMB": 300})
        for task in group.get("Tasks") or []:
            task.setdefault("Driver", "docker")
            task.setdefault("Config", {})
            task.setdefault("Env", None)
            task.setdefault("Meta", None)
            task.setdefault("User", "")
            task.setdefault("KillTimeout", 5 * SECOND_NS)
            task.setdefault("KillSignal", "")
            task.setdefault("Templates", None)
            task.setdefault("DispatchPayload", None)
            task.setdefault("Lifecycle", None)
            task["RestartPolicy"] = {**group["RestartPolicy"], **(task.get("RestartPolicy") or {})}
            res = task.get("Resources") or {}
            task["Resources"] = {"CPU": 100, "MemoryMB": 300, "MemoryMaxMB": 0, **res}
            task.setdefault("LogConfig", {"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False})
    return job


def validate_register(job: JSON) -> str | None:
    """The subset of ``Job.Validate`` that pyexec can trip over; an error text or None."""
    pj = job.get("ParameterizedJob")
    if pj is not None:
        if job["Type"] not in ("batch", "sysbatch"):
            return 'Parameterized job can only be used with "batch" or "sysbatch" scheduler'
        payload = pj.get("Payload") or "optional"
        pj["Payload"] = payload
        if payload not in ("optional", "required", "forbidden"):
            return f'Unknown payload requirement: "{payload}"'
        overlap = set(pj.get("MetaRequired") or []) & set(pj.get("MetaOptional") or [])
        if overlap:
            # ParameterizedJobConfig.Validate
            return (
                "Required and optional meta keys should be disjoint."
                f" Following keys exist in both: {_go_list(sorted(overlap))}"
            )
    if not job.get("TaskGroups"):
        return "Missing job task groups"
    for group in job["TaskGroups"]:
        if not group.get("Tasks"):
            return f"Task group {group.get('Name')} validation failed: Missing tasks for task group"
        for task in group["Tasks"]:
            if task.get("Driver") != "docker":
                return f"nomadsim runs docker tasks only, not {task.get('Driver')!r}"
    return None


def dispatched_id(parent: str, prefix_template: str, now: float | None = None) -> str:
    """``structs.DispatchedID``: ``<parent>/dispatch-[<prefix>-]<unix>-<8 hex>``."""
    unix = int(time.time() if now is None else now)
    suffix = secrets.token_hex(4)
    if prefix_template:
        return f"{parent}/dispatch-{prefix_template}-{unix}-{suffix}"
    return f"{parent}/dispatch-{unix}-{suffix}"


def validate_dispatch(job: JSON | None, job_id: str, payload: bytes, meta: dict[str, str]) -> None:
    """``Job.Dispatch`` checks in nomad/job_endpoint.go, in the same order, same texts."""
    if job is None:
        raise DispatchError("parameterized job not found")
    pj = job.get("ParameterizedJob")
    if pj is None or job.get("Dispatched"):
        raise DispatchError(f'Specified job "{job_id}" is not a parameterized job')
    if job.get("Stop"):
        raise DispatchError(f'Specified job "{job_id}" is stopped')
    mode = pj.get("Payload") or "optional"
    if mode == "required" and not payload:
        raise DispatchError("Payload is not provided but required by parameterized job")
    if mode == "forbidden" and payload:
        raise DispatchError("Payload provided but forbidden by parameterized job")
    if len(payload) > DISPATCH_PAYLOAD_LIMIT:
        raise DispatchError(
            f"Payload exceeds maximum size; {len(payload)} > {DISPATCH_PAYLOAD_LIMIT}"
        )
    required = set(pj.get("MetaRequired") or [])
    allowed = required | set(pj.get("MetaOptional") or [])
    unpermitted = [k for k in meta if k not in allowed]
    if unpermitted:
        raise DispatchError(
            f"Dispatch request included unpermitted metadata keys: {_go_list(unpermitted)}"
        )
    missing = [k for k in pj.get("MetaRequired") or [] if k not in meta]
    if missing:
        raise DispatchError(f"Dispatch did not provide required meta keys: {_go_list(missing)}")


def lifecycle_of(task: JSON) -> tuple[str, bool]:
    """(hook, sidecar); hook is "main" for tasks without a lifecycle block."""
    lc = task.get("Lifecycle") or {}
    hook = lc.get("Hook") or "main"
    return hook, bool(lc.get("Sidecar"))


def group_demand(group: JSON) -> tuple[int, int]:
    """(cpu MHz, memory MB) the group asks the node for.

    Simplified from ``AllocatedResources.Comparable``: main tasks and sidecars
    add up; ephemeral prestart and poststop tasks reuse that room (their max).
    """
    main_cpu = main_mem = eph_cpu = eph_mem = 0
    for task in group.get("Tasks") or []:
        res = task.get("Resources") or {}
        cpu, mem = int(res.get("CPU") or 0), int(res.get("MemoryMB") or 0)
        hook, sidecar = lifecycle_of(task)
        if hook == "main" or sidecar:
            main_cpu, main_mem = main_cpu + cpu, main_mem + mem
        else:
            eph_cpu, eph_mem = max(eph_cpu, cpu), max(eph_mem, mem)
    return max(main_cpu, eph_cpu), max(main_mem, eph_mem)


def _clean(name: str) -> str:
    """``helper.CleanEnvVar``: anything but [A-Za-z0-9_.] becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", name)


def task_env(alloc: JSON, job: JSON, group: JSON, task: JSON, node: JSON) -> dict[str, str]:
    """The environment ``client/taskenv`` builds for a docker task (paths as seen inside)."""
    res = task.get("Resources") or {}
    env: dict[str, str] = {
        "NOMAD_ALLOC_DIR": "/alloc",
        "NOMAD_TASK_DIR": "/local",
        "NOMAD_SECRETS_DIR": "/secrets",
        "NOMAD_MEMORY_LIMIT": str(res.get("MemoryMB") or 0),
        "NOMAD_CPU_LIMIT": str(res.get("CPU") or 0),
        "NOMAD_ALLOC_ID": alloc["ID"],
        "NOMAD_SHORT_ALLOC_ID": alloc["ID"][:8],
        "NOMAD_ALLOC_NAME": alloc["Name"],
        "NOMAD_ALLOC_INDEX": "0",
        "NOMAD_GROUP_NAME": group["Name"],
        "NOMAD_TASK_NAME": task["Name"],
        "NOMAD_JOB_ID": job["ID"],
        "NOMAD_JOB_NAME": job["Name"],
        "NOMAD_JOB_PARENT_ID": job.get("ParentID") or "",
        "NOMAD_DC": node["Datacenter"],
        "NOMAD_NAMESPACE": job["Namespace"],
        "NOMAD_REGION": job["Region"],
    }
    if res.get("MemoryMaxMB"):
        env["NOMAD_MEMORY_MAX_LIMIT"] = str(res["MemoryMaxMB"])
    meta: dict[str, str] = {}
    if job.get("Dispatched"):
        for key in (job.get("ParameterizedJob") or {}).get("MetaOptional") or []:
            meta[key] = ""
    for layer in (job.get("Meta"), group.get("Meta"), task.get("Meta")):
        meta.update(layer or {})
    for key, value in meta.items():
        env[_clean("NOMAD_META_" + key.upper())] = value
        env[_clean("NOMAD_META_" + key)] = value
    for key, value in (task.get("Env") or {}).items():
        env[key] = interpolate(str(value), env, node, meta)
    return env


_VAR = re.compile(r"\$\{([^}]+)\}")


def interpolate(
    text: str, env: dict[str, str], node: JSON, meta: dict[str, str] | None = None
) -> str:
    """``taskenv.ReplaceEnv``: known ``${...}`` names are replaced, unknown ones stay verbatim."""
    attrs: dict[str, str] = {f"attr.{k}": v for k, v in node["Attributes"].items()}
    attrs |= {
        "node.unique.id": node["ID"],
        "node.unique.name": node["Name"],
        "node.datacenter": node["Datacenter"],
        "node.class": node["NodeClass"],
        "node.pool": node["NodePool"],
        "node.region": "global",
    }
    attrs |= {f"meta.{k}": v for k, v in (meta or {}).items()}

    def sub(match: re.Match[str]) -> str:
        name = match.group(1).strip()
        if name in env:
            return env[name]
        if name in attrs:
            return attrs[name]
        return match.group(0)

    return _VAR.sub(sub, text)


def interpolate_deep(value: Any, env: dict[str, str], node: JSON) -> Any:
    """Interpolate every string inside a docker ``config`` value."""
    if isinstance(value, str):
        return interpolate(value, env, node)
    if isinstance(value, list):
        return [interpolate_deep(v, env, node) for v in value]
    if isinstance(value, dict):
        return {k: interpolate_deep(v, env, node) for k, v in value.items()}
    return value


def _target(expr: str, node: JSON) -> tuple[str | None, bool]:
    """Resolve a constraint side: ``${attr.x}`` / ``${node.x}`` / ``${meta.x}`` or a literal."""
    match = _VAR.fullmatch(expr.strip())
    if match is None:
        return expr, True
    resolved = interpolate(expr, {}, node)
    if resolved == expr:
        return None, False
    return resolved, True


def failed_constraints(job: JSON, group: JSON, node: JSON) -> list[str]:
    """Constraints of the job, the group and its tasks the node fails, as Nomad names them.

    ``checkConstraint`` in scheduler/feasible/feasible.go for the operands a
    single node can answer; version/semver/order comparisons are not simulated
    and pass. The key is ``Constraint.String()``: "<LTarget> <Operand> <RTarget>".
    """
    constraints = [*(job.get("Constraints") or []), *(group.get("Constraints") or [])]
    for task in group.get("Tasks") or []:
        constraints += task.get("Constraints") or []
    failed = []
    for c in constraints:
        operand = c.get("Operand") or "="
        left, lfound = _target(c.get("LTarget") or "", node)
        right, rfound = _target(c.get("RTarget") or "", node)
        if operand in ("=", "==", "is"):
            ok = lfound and rfound and left == right
        elif operand in ("!=", "not"):
            ok = left != right
        elif operand == "is_set":
            ok = lfound
        elif operand == "is_not_set":
            ok = not lfound
        elif operand == "regexp":
            ok = lfound and rfound and re.search(str(right), str(left)) is not None
        elif operand in ("set_contains", "set_contains_all", "set_contains_any"):
            have = {s.strip() for s in str(left).split(",")}
            want = {s.strip() for s in str(right).split(",")}
            hit = want <= have if operand != "set_contains_any" else bool(want & have)
            ok = lfound and rfound and hit
        else:
            ok = True  # distinct_hosts/property, version, semver, ordering: not simulated
        if not ok:
            failed.append(f"{c.get('LTarget')} {operand} {c.get('RTarget')}")
    return failed


def datacenter_matches(job: JSON, node: JSON) -> bool:
    """Job ``Datacenters`` are globs (Nomad 1.5+); node pool must be the node's or "all"."""
    pool = job.get("NodePool") or "default"
    if pool not in ("all", node["NodePool"]):
        return False
    return any(fnmatch.fnmatchcase(node["Datacenter"], dc) for dc in job.get("Datacenters") or [])
