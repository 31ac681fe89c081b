"""Builders of the JSON records the sim stores and serves, shaped like Nomad's API structs.

Sources: ``api/evaluations.go`` (``Evaluation``, ``AllocationMetric``),
``api/allocations.go`` (``Allocation``, ``AllocListStub``), ``api/jobs.go``
(``JobListStub``, ``JobSummary``), ``nomad/state/state_store.go``
(``getJobStatus``), ``nomad/structs`` (``Allocation.TerminalStatus``).
"""

from __future__ import annotations

import copy
import time
import uuid
from typing import Any

from .state import State
from .taskrunner import ZERO_TIME

__all__ = [
    "JOB_STUB_FIELDS",
    "STUB_FIELDS",
    "TERMINAL_CLIENT",
    "TERMINAL_EVAL",
    "alloc_terminal",
    "job_diff",
    "job_status",
    "metric",
    "metric_filtered",
    "metric_no_nodes",
    "new_alloc",
    "new_eval",
    "summaries",
]

JSON = dict[str, Any]
TERMINAL_CLIENT = {"complete", "failed", "lost"}
TERMINAL_EVAL = {"complete", "failed", "cancelled"}

STUB_FIELDS = (
    "ID",
    "EvalID",
    "Name",
    "Namespace",
    "NodeID",
    "NodeName",
    "JobID",
    "JobType",
    "JobVersion",
    "TaskGroup",
    "DesiredStatus",
    "DesiredDescription",
    "ClientStatus",
    "ClientDescription",
    "TaskStates",
    "DeploymentStatus",
    "FollowupEvalID",
    "NextAllocation",
    "RescheduleTracker",
    "PreemptedAllocations",
    "PreemptedByAllocation",
    "CreateIndex",
    "ModifyIndex",
    "CreateTime",
    "ModifyTime",
)
JOB_STUB_FIELDS = (
    "ID",
    "ParentID",
    "Name",
    "Namespace",
    "Datacenters",
    "NodePool",
    "Type",
    "Priority",
    "Periodic",
    "ParameterizedJob",
    "Stop",
    "Status",
    "StatusDescription",
    "JobSummary",
    "CreateIndex",
    "ModifyIndex",
    "JobModifyIndex",
    "SubmitTime",
    "Meta",
)


def alloc_terminal(alloc: JSON) -> bool:
    """``Allocation.TerminalStatus``: desired stop/evict, or a terminal client status."""
    return alloc["DesiredStatus"] in ("stop", "evict") or alloc["ClientStatus"] in TERMINAL_CLIENT


def new_eval(job: JSON, index: int, triggered_by: str, status: str = "pending") -> JSON:
    """A fresh ``Evaluation`` (api/evaluations.go fields)."""
    now = time.time_ns()
    return {
        "ID": str(uuid.uuid4()),
        "Namespace": job["Namespace"],
        "Priority": job["Priority"],
        "Type": job["Type"],
        "TriggeredBy": triggered_by,
        "JobID": job["ID"],
        "JobModifyIndex": job.get("JobModifyIndex", index),
        "NodeID": "",
        "NodeModifyIndex": 0,
        "DeploymentID": "",
        "Status": status,
        "StatusDescription": "",
        "Wait": 0,
        "WaitUntil": ZERO_TIME,
        "NextEval": "",
        "PreviousEval": "",
        "BlockedEval": "",
        "RelatedEvals": None,
        "FailedTGAllocs": None,
        "ClassEligibility": None,
        "EscapedComputedClass": False,
        "QuotaLimitReached": "",
        "AnnotatePlan": False,
        "QueuedAllocations": None,
        "SnapshotIndex": 0,
        "CreateIndex": index,
        "ModifyIndex": index,
        "CreateTime": now,
        "ModifyTime": now,
    }


def job_status(job: JSON, allocs: list[JSON], evals: list[JSON]) -> str:
    """``getJobStatus`` in nomad/state/state_store.go."""
    if job["Type"] == "system" or (job.get("ParameterizedJob") and not job.get("Dispatched")):
        return "dead" if job["Stop"] else "running"
    if any(not alloc_terminal(a) for a in allocs):
        return "running"
    if any(e["Status"] not in TERMINAL_EVAL for e in evals):
        return "pending"
    if evals or allocs or job["Stop"]:
        return "dead"
    return "pending"


def summaries(state: State, keys: list[tuple[str, str]]) -> dict[tuple[str, str], JSON]:
    """``JobSummary`` rows (api/jobs.go) for ``keys``, from one pass over the tables."""
    want = set(keys)
    groups: dict[tuple[str, str], dict[str, JSON]] = {}
    children: dict[tuple[str, str], JSON] = {}
    for key in want:
        job = state.jobs[key]
        groups[key] = {
            g["Name"]: dict.fromkeys(
                ("Queued", "Complete", "Failed", "Running", "Starting", "Lost", "Unknown"), 0
            )
            for g in job["TaskGroups"]
        }
        if job.get("ParameterizedJob") and not job.get("Dispatched"):
            children[key] = {"Pending": 0, "Running": 0, "Dead": 0}
    column = {
        "pending": "Starting",
        "running": "Running",
        "complete": "Complete",
        "failed": "Failed",
        "lost": "Lost",
        "unknown": "Unknown",
    }
    for alloc in state.allocs.values():
        rows = groups.get((alloc["Namespace"], alloc["JobID"]))
        if rows is not None and alloc["TaskGroup"] in rows:
            rows[alloc["TaskGroup"]][column[alloc["ClientStatus"]]] += 1
    for ev in state.evals.values():
        rows = groups.get((ev["Namespace"], ev["JobID"]))
        if rows is None or ev["Status"] != "blocked":
            continue
        previous = state.evals.get(ev["PreviousEval"]) or {}
        for name in previous.get("FailedTGAllocs") or {}:
            if name in rows:
                rows[name]["Queued"] += 1
    for (n, _), job in state.jobs.items():
        counts = children.get((n, job.get("ParentID") or ""))
        if counts is not None and job.get("Dispatched"):
            counts[job["Status"].capitalize()] += 1
    out = {}
    for key in want:
        job = state.jobs[key]
        out[key] = {
            "JobID": job["ID"],
            "Namespace": job["Namespace"],
            "Summary": groups[key],
            "Children": children.get(key, {"Pending": 0, "Running": 0, "Dead": 0}),
            "CreateIndex": job["CreateIndex"],
            "ModifyIndex": job["ModifyIndex"],
        }
    return out


def metric(node: JSON, dimension: str) -> JSON:
    """``AllocationMetric`` for one exhausted node (scheduler/rank.go wording)."""
    return {
        "NodesEvaluated": 1,
        "NodesFiltered": 0,
        "NodesInPool": 1,
        "NodePool": "default",
        "NodesAvailable": {node["Datacenter"]: 1},
        "ClassFiltered": None,
        "ConstraintFiltered": None,
        "NodesExhausted": 1,
        "ClassExhausted": None,
        "DimensionExhausted": {dimension: 1},
        "QuotaExhausted": None,
        "ResourcesExhausted": None,
        "Scores": None,
        "ScoreMetaData": None,
        "AllocationTime": 10_000,
        "CoalescedFailures": 0,
    }


def metric_filtered(node: JSON, constraints: list[str]) -> JSON:
    """The node was filtered out by constraints (``ConstraintFiltered``)."""
    return {
        **metric(node, "memory"),
        "NodesFiltered": 1,
        "ConstraintFiltered": dict.fromkeys(constraints, 1),
        "NodesExhausted": 0,
        "DimensionExhausted": None,
    }


def metric_no_nodes(node: JSON, job: JSON) -> JSON:
    """No node in the job's datacenters / node pool: nothing evaluated."""
    return {
        **metric(node, "memory"),
        "NodesEvaluated": 0,
        "NodesInPool": 0,
        "NodesAvailable": dict.fromkeys(job.get("Datacenters") or [], 0),
        "NodesExhausted": 0,
        "DimensionExhausted": None,
    }


def new_alloc(job: JSON, group: JSON, i: int, eval_id: str, node: JSON, index: int) -> JSON:
    """A placed ``Allocation`` (api/allocations.go fields), pending on the client."""
    now = time.time_ns()
    tasks = {
        t["Name"]: {
            "Cpu": {"CpuShares": t["Resources"]["CPU"], "ReservedCores": None},
            "Memory": {
                "MemoryMB": t["Resources"]["MemoryMB"],
                "MemoryMaxMB": t["Resources"].get("MemoryMaxMB", 0),
            },
            "Networks": None,
            "Devices": None,
        }
        for t in group["Tasks"]
    }
    alloc: JSON = {
        "ID": str(uuid.uuid4()),
        "Namespace": job["Namespace"],
        "EvalID": eval_id,
        "Name": f"{job['ID']}.{group['Name']}[{i}]",
        "NodeID": node["ID"],
        "NodeName": node["Name"],
        "JobID": job["ID"],
        "JobType": job["Type"],
        "JobVersion": job["Version"],
        "Job": copy.deepcopy(job),
        "TaskGroup": group["Name"],
        "AllocatedResources": {
            "Tasks": tasks,
            "TaskLifecycles": {t["Name"]: t.get("Lifecycle") for t in group["Tasks"]},
            "Shared": {
                "DiskMB": group["EphemeralDisk"]["SizeMB"],
                "Networks": None,
                "Ports": None,
            },
        },
        "Metrics": {
            **metric(node, "memory"),
            "NodesExhausted": 0,
            "DimensionExhausted": None,
        },
        "DesiredStatus": "run",
        "DesiredDescription": "",
        "DesiredTransition": {
            "Migrate": None,
            "Reschedule": None,
            "ForceReschedule": None,
            "NoShutdownDelay": None,
        },
        "ClientStatus": "pending",
        "ClientDescription": "",
        "TaskStates": None,
        "DeploymentID": "",
        "DeploymentStatus": None,
        "FollowupEvalID": "",
        "PreviousAllocation": "",
        "NextAllocation": "",
        "RescheduleTracker": None,
        "NetworkStatus": None,
        "PreemptedAllocations": None,
        "PreemptedByAllocation": "",
        "CreateIndex": index,
        "ModifyIndex": index,
        "AllocModifyIndex": index,
        "CreateTime": now,
        "ModifyTime": now,
    }
    return alloc


# nomad/structs/diff.go Job.Diff: fields that never count as a change.
DIFF_IGNORED = frozenset(
    [
        "ID",
        "Status",
        "StatusDescription",
        "Version",
        "Stable",
        "CreateIndex",
        "ModifyIndex",
        "JobModifyIndex",
        "Update",
        "SubmitTime",
        "NomadTokenID",
        "VaultToken",
    ]
)


def _flatten(value: Any, prefix: str, out: dict[str, str]) -> dict[str, str]:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _flatten(item, f"{prefix}[{i}]", out)
    elif value is not None:
        out[prefix] = str(value)
    return out


def _field_diffs(old: JSON | None, new: JSON | None) -> list[JSON]:
    before = _flatten({k: v for k, v in (old or {}).items() if k not in DIFF_IGNORED}, "", {})
    after = _flatten({k: v for k, v in (new or {}).items() if k not in DIFF_IGNORED}, "", {})
    diffs = []
    for name in sorted(set(before) | set(after)):
        if before.get(name) == after.get(name):
            continue
        kind = "Added" if name not in before else "Deleted" if name not in after else "Edited"
        diffs.append(
            {
                "Type": kind,
                "Name": name,
                "Old": before.get(name, ""),
                "New": after.get(name, ""),
                "Annotations": None,
            }
        )
    return diffs


def job_diff(old: JSON | None, new: JSON) -> JSON:
    """``Job.Diff`` (nomad/structs/diff.go): the ``Type`` is faithful (None, Added, Edited);
    the details are simplified to flattened field paths, task groups matched by name."""
    if old is None:
        return {
            "Type": "Added",
            "ID": new["ID"],
            "Fields": None,
            "Objects": None,
            "TaskGroups": None,
        }
    job_fields = _field_diffs(
        {k: v for k, v in old.items() if k != "TaskGroups"},
        {k: v for k, v in new.items() if k != "TaskGroups"},
    )
    old_groups = {g["Name"]: g for g in old.get("TaskGroups") or []}
    new_groups = {g["Name"]: g for g in new.get("TaskGroups") or []}
    groups = []
    for name in sorted(set(old_groups) | set(new_groups)):
        fields = _field_diffs(old_groups.get(name), new_groups.get(name))
        if name not in old_groups:
            kind = "Added"
        elif name not in new_groups:
            kind = "Deleted"
        else:
            kind = "Edited" if fields else "None"
        groups.append(
            {
                "Type": kind,
                "Name": name,
                "Fields": fields or None,
                "Objects": None,
                "Tasks": None,
                "Updates": None,
            }
        )
    edited = bool(job_fields) or any(g["Type"] != "None" for g in groups)
    return {
        "Type": "Edited" if edited else "None",
        "ID": new["ID"],
        "Fields": job_fields or None,
        "Objects": None,
        "TaskGroups": groups,
    }
