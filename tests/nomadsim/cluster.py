"""The sim's server + client logic: register, dispatch, schedule, stop, GC.

HTTP-free: ``server.py`` parses requests and calls these methods; they raise
:class:`ApiError` carrying the status code and text real Nomad would answer.
Sources: ``nomad/job_endpoint.go`` (Register, Dispatch, Deregister),
``nomad/state/state_store.go`` (``getJobStatus``), ``scheduler/`` (failed
placements: ``FailedTGAllocs``, blocked evals), ``api/evaluations.go``.
"""

from __future__ import annotations

import base64
import copy
import queue
import threading
import time
import uuid
from collections import deque
from typing import Any

from . import records
from .allocrunner import AllocRunner
from .jobspec import (
    DispatchError,
    canonicalize,
    datacenter_matches,
    dispatched_id,
    failed_constraints,
    group_demand,
    validate_dispatch,
    validate_register,
)
from .state import Change, State
from .taskrunner import ZERO_TIME

__all__ = ["ApiError", "Cluster"]

JSON = dict[str, Any]
#: client/client.go allocSyncIntv: how often the client sends alloc updates to the servers.
ALLOC_SYNC_S = 0.2


class ApiError(Exception):
    """An HTTP error answer: Nomad writes ``text`` as a text/plain body."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


class Cluster:
    """One server and one client node, in memory, with real Docker tasks."""

    def __init__(
        self,
        docker_client: Any,
        data_dir: str,
        *,
        node_cpu_mhz: int = 4000,
        node_memory_mb: int = 8192,
        event_buffer: int = 100,
        max_kill_timeout_s: float = 30.0,
        client_gc_max_allocs: int | None = 50,
        client_gc_interval_s: float = 60.0,
        consul_addr: str | None = None,
    ) -> None:
        self.docker = docker_client
        #: The client's Consul, for templates (Nomad's default: the node's 127.0.0.1:8500).
        self.consul_addr = consul_addr or "127.0.0.1:8500"
        self.data_dir = data_dir
        self.sim_id = uuid.uuid4().hex[:12]
        self.state = State(event_buffer)
        self.node_cpu_mhz = node_cpu_mhz
        self.node_memory_mb = node_memory_mb
        self.max_kill_timeout_ns = int(max_kill_timeout_s * 1e9)
        # client/gc.go: past gc_max_allocs tracked allocs, terminal ones are destroyed
        # (dir and logs gone) oldest first, on placement and every gc_interval.
        self.client_gc_max_allocs = client_gc_max_allocs
        self.finished: deque[str] = deque()
        self._gc_lock = threading.Lock()
        self._gc_stop = threading.Event()
        self._gc_interval_s = client_gc_interval_s
        self._gc_thread = threading.Thread(
            target=self._client_gc_loop, name="nomadsim-client-gc", daemon=True
        )
        self._sync_lock = threading.Lock()
        self._unsynced: dict[str, tuple[dict[str, JSON], str, str]] = {}
        self._sync_stop = threading.Event()
        self._sync_thread = threading.Thread(
            target=self._client_sync_loop, name="nomadsim-client-sync", daemon=True
        )
        node_id = str(uuid.uuid4())
        self.node: JSON = {
            "ID": node_id,
            "Name": "nomadsim-node",
            "Datacenter": "dc1",
            "NodeClass": "",
            "NodePool": "default",
            "Attributes": {
                "kernel.name": "linux",
                "cpu.arch": "amd64",
                "driver.docker": "1",
                "unique.hostname": "nomadsim-node",
                "os.name": "debian",
                "nomad.version": "1.6.5",  # the version the double was checked against
            },
        }
        self.hold = False
        self.closing = False
        self.dispatch_failure: str | None = None
        self.dispatch_failures_left: int | None = None
        self.held: deque[tuple[str, str, str]] = deque()
        self.runners: dict[str, AllocRunner] = {}
        self.payloads: dict[tuple[str, str], bytes] = {}
        self._evals: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
        self._scheduler = threading.Thread(
            target=self._schedule_loop, name="nomadsim-sched", daemon=True
        )
        self._scheduler.start()
        self._gc_thread.start()
        self._sync_thread.start()

    # -- helpers -------------------------------------------------------------
    def _job_status(self, job: JSON) -> str:
        ns, job_id = job["Namespace"], job["ID"]
        return records.job_status(
            job, self.state.allocs_of_job(ns, job_id), self.state.evals_of_job(ns, job_id)
        )

    def _refresh_job(self, ns: str, job_id: str, changes: list[Change]) -> None:
        job = self.state.jobs.get((ns, job_id))
        if job is None:
            return
        status = self._job_status(job)
        if status != job["Status"]:
            job["Status"] = status
            changes.append(Change("jobs", (ns, job_id), [("jobs_list",)]))

    @staticmethod
    def _alloc_change(alloc: JSON) -> Change:
        return Change("allocs", alloc["ID"], [("job_allocs", alloc["Namespace"], alloc["JobID"])])

    @staticmethod
    def _eval_change(ev: JSON) -> Change:
        return Change("evals", ev["ID"], [("job_evals", ev["Namespace"], ev["JobID"])])

    # -- jobs ----------------------------------------------------------------
    def _checked(self, ns: str, job: JSON) -> JSON:
        """The job as Register/Plan see it: canonicalized and validated (500 when invalid)."""
        job = copy.deepcopy(job)
        job["Namespace"] = job.get("Namespace") or ns
        canonicalize(job)
        problem = validate_register(job)
        if problem is not None:
            # guessed: multierror wording; Job.Register errors are plain RPC errors, so 500.
            raise ApiError(500, f"1 error occurred:\n\t* {problem}\n\n")
        return job

    def plan(self, ns: str, job: JSON) -> JSON:
        """``Job.Plan`` dry run: what registering ``job`` would change (``Diff.Type``)."""
        job = self._checked(ns, job)
        with self.state.lock:
            old = self.state.jobs.get((job["Namespace"], job["ID"]))
            diff = records.job_diff(old, job)
            index = self.state.index
        return {
            "JobModifyIndex": old["JobModifyIndex"] if old else 0,
            "CreatedEvals": None,
            "Diff": diff,
            # simplified: no scheduler dry run, so no placements are predicted.
            "Annotations": {"DesiredTGUpdates": None, "PreemptedAllocs": None},
            "FailedTGAllocs": None,
            "NextPeriodicLaunch": ZERO_TIME,
            "Warnings": "",
            "Index": index,
        }

    def register(self, ns: str, job: JSON) -> JSON:
        job = self._checked(ns, job)
        key = (job["Namespace"], job["ID"])
        out: JSON = {}

        def write(index: int) -> list[Change]:
            old = self.state.jobs.get(key)
            job["CreateIndex"] = old["CreateIndex"] if old else index
            job["Version"] = old["Version"] + 1 if old else 0
            job["JobModifyIndex"] = index
            job["ModifyIndex"] = index
            job["SubmitTime"] = time.time_ns()
            job["Status"] = "pending"
            job["StatusDescription"] = ""
            self.state.jobs[key] = job
            changes = [Change("jobs", key, [("jobs_list",)])]
            out.update(EvalID="", EvalCreateIndex=0, JobModifyIndex=index)
            if not job.get("ParameterizedJob") and not job.get("Periodic"):
                ev = records.new_eval(job, index, "job-register")
                self.state.evals[ev["ID"]] = ev
                changes.append(self._eval_change(ev))
                out.update(EvalID=ev["ID"], EvalCreateIndex=index)
                self._evals.put((key[0], key[1], ev["ID"]))
            job["Status"] = self._job_status(job)
            return changes

        index = self.state.commit(write)
        return {**out, "Warnings": "", "Index": index, "LastContact": 0, "KnownLeader": False}

    def get_job(self, ns: str, job_id: str) -> JSON:
        with self.state.lock:
            job = self.state.jobs.get((ns, job_id))
            if job is None:
                raise ApiError(404, "job not found")
            return copy.deepcopy(job)

    def job_summary(self, ns: str, job_id: str) -> JSON:
        with self.state.lock:
            if (ns, job_id) not in self.state.jobs:
                raise ApiError(404, "job not found")
            return records.summaries(self.state, [(ns, job_id)])[(ns, job_id)]

    def list_allocs(self, ns: str, prefix: str) -> list[JSON]:
        with self.state.lock:
            allocs = sorted(
                (
                    a
                    for a in self.state.allocs.values()
                    if (ns == "*" or a["Namespace"] == ns) and a["ID"].startswith(prefix)
                ),
                key=lambda a: a["ID"],
            )
            return [{f: copy.deepcopy(a.get(f)) for f in records.STUB_FIELDS} for a in allocs]

    def list_jobs(self, ns: str, prefix: str, with_meta: bool = False) -> list[JSON]:
        """``JobListStub`` rows; ``Meta`` only with ``?meta=true`` (Nomad 1.6+)."""
        with self.state.lock:
            jobs = sorted(
                (
                    j
                    for (n, i), j in self.state.jobs.items()
                    if (ns == "*" or n == ns) and i.startswith(prefix)
                ),
                key=lambda j: j["ID"],
            )
            summaries = records.summaries(self.state, [(j["Namespace"], j["ID"]) for j in jobs])
            stubs = []
            for job in jobs:
                stub = {f: copy.deepcopy(job.get(f)) for f in records.JOB_STUB_FIELDS}
                stub["JobSummary"] = summaries[(job["Namespace"], job["ID"])]
                if not with_meta:
                    del stub["Meta"]
                stub["ParameterizedJob"] = job.get("ParameterizedJob") is not None
                stub["Periodic"] = job.get("Periodic") is not None
                stubs.append(stub)
            return stubs

    def dispatch(
        self,
        ns: str,
        job_id: str,
        payload: bytes,
        meta: dict[str, str],
        prefix_template: str,
        token: str,
    ) -> JSON:
        failure = self.dispatch_failure
        if failure is not None:
            if self.dispatch_failures_left is not None:
                self.dispatch_failures_left -= 1
                if self.dispatch_failures_left <= 0:
                    self.dispatch_failure = self.dispatch_failures_left = None
            raise ApiError(500, failure)
        out: JSON = {}

        def write(index: int) -> list[Change]:
            parent = self.state.jobs.get((ns, job_id))
            try:
                validate_dispatch(parent, job_id, payload, meta)
            except DispatchError as exc:
                raise ApiError(500, str(exc)) from None
            assert parent is not None
            if token:
                for (n, _), child in self.state.jobs.items():
                    if (
                        n == ns
                        and child.get("ParentID") == job_id
                        and child.get("DispatchIdempotencyToken") == token
                    ):
                        out.update(
                            DispatchedJobID=child["ID"],
                            EvalID="",
                            EvalCreateIndex=0,
                            JobCreateIndex=child["CreateIndex"],
                            Index=child["ModifyIndex"],
                        )
                        return []
            child = copy.deepcopy(parent)
            child["ID"] = dispatched_id(job_id, prefix_template)
            child["Name"] = child["ID"]
            child["ParentID"] = job_id
            child["Dispatched"] = True
            child["DispatchIdempotencyToken"] = token
            child["Meta"] = {**(parent.get("Meta") or {}), **meta} or None
            # simplified: Nomad stores the payload snappy-compressed; the sim keeps it raw.
            child["Payload"] = base64.b64encode(payload).decode() if payload else None
            child["CreateIndex"] = child["ModifyIndex"] = child["JobModifyIndex"] = index
            child["SubmitTime"] = time.time_ns()
            child["Version"] = 0
            child["Status"] = "pending"
            key = (ns, child["ID"])
            self.state.jobs[key] = child
            self.payloads[key] = payload
            ev = records.new_eval(child, index, "job-register")
            self.state.evals[ev["ID"]] = ev
            self._evals.put((ns, child["ID"], ev["ID"]))
            out.update(
                DispatchedJobID=child["ID"],
                EvalID=ev["ID"],
                EvalCreateIndex=index,
                JobCreateIndex=index,
                Index=index,
            )
            return [Change("jobs", key, [("jobs_list",)]), self._eval_change(ev)]

        self.state.commit(write)
        return out

    def stop_job(self, ns: str, job_id: str, purge: bool) -> JSON:
        out: JSON = {"EvalID": "", "EvalCreateIndex": 0, "JobModifyIndex": 0}
        to_stop: list[AllocRunner] = []

        def write(index: int) -> list[Change]:
            key = (ns, job_id)
            job = self.state.jobs.get(key)
            if job is None:
                return []
            changes: list[Change] = []
            job["Stop"] = True
            job["JobModifyIndex"] = index
            ev = records.new_eval(job, index, "job-deregister", status="complete")
            self.state.evals[ev["ID"]] = ev
            changes.append(self._eval_change(ev))
            for other in self.state.evals_of_job(ns, job_id):
                if other["Status"] in ("blocked", "pending"):
                    other["Status"] = "cancelled"
                    # nomad/leader.go reapCancelableEvaluations wording; done there, later.
                    other["StatusDescription"] = "canceled after more recent eval was processed"
                    changes.append(self._eval_change(other))
            for alloc in self.state.allocs_of_job(ns, job_id):
                if not records.alloc_terminal(alloc):
                    alloc["DesiredStatus"] = "stop"
                    # scheduler/structs/const.go StatusAllocNotNeeded
                    alloc["DesiredDescription"] = "alloc not needed due to job update"
                    alloc["AllocModifyIndex"] = index
                    changes.append(self._alloc_change(alloc))
                    runner = self.runners.get(alloc["ID"])
                    if runner is not None:
                        to_stop.append(runner)
            if purge:
                del self.state.jobs[key]
                self.payloads.pop(key, None)
                changes.append(Change("jobs", key, [("jobs_list",)]))
            else:
                job["Status"] = self._job_status(job)
                changes.append(Change("jobs", key, [("jobs_list",)]))
            out.update(EvalID=ev["ID"], EvalCreateIndex=index, JobModifyIndex=index)
            return changes

        index = self.state.commit(write)
        for runner in to_stop:
            runner.stop()
        return {**out, "Index": index, "LastContact": 0, "KnownLeader": False}

    # -- scheduling ------------------------------------------------------------
    def _schedule_loop(self) -> None:
        while True:
            item = self._evals.get()
            if item is None:
                return
            self._schedule(*item)

    def _feasibility(self, job: JSON, group: JSON) -> JSON | None:
        """The ``AllocationMetric`` of a group the node cannot take, or None if it fits."""
        cpu, mem = group_demand(group)
        refused = failed_constraints(job, group, self.node)
        if not datacenter_matches(job, self.node):
            return records.metric_no_nodes(self.node, job)
        if refused:
            return records.metric_filtered(self.node, refused)
        if mem > self.node_memory_mb:
            return records.metric(self.node, "memory")
        if cpu > self.node_cpu_mhz:
            return records.metric(self.node, "cpu")
        return None

    def _schedule(self, ns: str, job_id: str, eval_id: str) -> None:
        placed: list[AllocRunner] = []

        def write(index: int) -> list[Change]:
            ev = self.state.evals.get(eval_id)
            job = self.state.jobs.get((ns, job_id))
            if ev is None or ev["Status"] != "pending":
                return []
            changes: list[Change] = [self._eval_change(ev)]
            ev["Status"] = "complete"
            if job is None or job["Stop"]:
                return changes
            failed: JSON = {}
            held_only = True  # every failure is the hold switch's: release() may place it
            for group in job["TaskGroups"]:
                metric = self._feasibility(job, group)
                if metric is None and self.hold:
                    # guessed: a full node is reported as exhausted memory.
                    metric = records.metric(self.node, "memory")
                elif metric is not None:
                    held_only = False
                if metric is not None:
                    failed[group["Name"]] = metric
            ev["QueuedAllocations"] = {
                g["Name"]: int(g["Name"] in failed) for g in job["TaskGroups"]
            }
            if failed:
                ev["FailedTGAllocs"] = failed
                blocked = records.new_eval(job, index, "queued-allocs", status="blocked")
                blocked["PreviousEval"] = ev["ID"]
                # scheduler/structs/const.go DescBlockedEvalFailedPlacements
                blocked["StatusDescription"] = "created to place remaining allocations"
                ev["BlockedEval"] = blocked["ID"]
                self.state.evals[blocked["ID"]] = blocked
                changes.append(self._eval_change(blocked))
                if held_only:
                    self.held.append((ns, job_id, blocked["ID"]))
            else:
                changes += self._place(job, ev, index, placed)
            self._refresh_job(ns, job_id, changes)
            return changes

        self.state.commit(write)
        for runner in placed:
            runner.start()
        if placed:
            self.client_gc()  # MakeRoomFor: new allocs trigger the client's GC

    def _place(self, job: JSON, ev: JSON, index: int, placed: list[AllocRunner]) -> list[Change]:
        changes = []
        for group in job["TaskGroups"]:
            for i in range(int(group.get("Count", 1))):
                alloc = records.new_alloc(job, group, i, ev["ID"], self.node, index)
                self.state.allocs[alloc["ID"]] = alloc
                changes.append(self._alloc_change(alloc))
                payload = self.payloads.get((job["Namespace"], job["ID"]), b"")
                runner = AllocRunner(self, alloc, alloc["Job"], payload)
                runner.on_done = self.finished.append
                self.runners[alloc["ID"]] = runner
                placed.append(runner)
        return changes

    def release(self, n: int) -> int:
        """Place the next ``n`` held dispatches (their blocked evals get unblocked)."""
        released = 0
        while released < n:
            try:
                ns, job_id, blocked_id = self.held.popleft()
            except IndexError:
                break
            placed: list[AllocRunner] = []

            def write(
                index: int,
                ns: str = ns,
                job_id: str = job_id,
                blocked_id: str = blocked_id,
                placed: list[AllocRunner] = placed,
            ) -> list[Change]:
                ev = self.state.evals.get(blocked_id)
                job = self.state.jobs.get((ns, job_id))
                if ev is None or ev["Status"] != "blocked" or job is None or job["Stop"]:
                    return []
                ev["Status"] = "complete"
                ev["QueuedAllocations"] = {g["Name"]: 0 for g in job["TaskGroups"]}
                changes = [self._eval_change(ev), *self._place(job, ev, index, placed)]
                self._refresh_job(ns, job_id, changes)
                return changes

            self.state.commit(write)
            for runner in placed:
                runner.start()
            if placed:
                self.client_gc()
                released += 1
        return released

    # -- client updates ----------------------------------------------------------
    def update_task_states(
        self, alloc_id: str, states: dict[str, JSON], client_status: str, description: str
    ) -> None:
        """The client's report of an alloc, sent with the next sync (``ALLOC_SYNC_S``)."""
        with self._sync_lock:
            self._unsynced[alloc_id] = (copy.deepcopy(states), client_status, description)

    def _client_sync_loop(self) -> None:
        """client/client.go ``allocSync``: the client sends the latest state of every alloc
        that changed, in one batch every 200 ms (``allocSyncIntv``). States a task passes
        through between two syncs never reach the servers: checked on Nomad 1.6.5, a short
        task's allocation goes pending -> complete with no running event between."""
        while not self._sync_stop.wait(ALLOC_SYNC_S):
            self.sync_allocs()

    def sync_allocs(self) -> None:
        with self._sync_lock:
            batch, self._unsynced = self._unsynced, {}
        if not batch:
            return

        def write(index: int) -> list[Change]:
            changes: list[Change] = []
            for alloc_id, (states, client_status, description) in batch.items():
                alloc = self.state.allocs.get(alloc_id)
                if alloc is None or alloc["ClientStatus"] == "lost":
                    continue  # a lost node's client reports nothing more
                alloc["TaskStates"] = states
                alloc["ClientStatus"] = client_status
                alloc["ClientDescription"] = description
                changes.append(self._alloc_change(alloc))
                self._refresh_job(alloc["Namespace"], alloc["JobID"], changes)
            return changes

        self.state.commit(write)

    def lose(self, alloc_id: str) -> None:
        """Fault: the node running ``alloc_id`` goes down.

        The server marks the alloc ``ClientStatus=lost``, ``DesiredStatus=stop``
        (scheduler/reconcile_util.go: "alloc is lost since its node is down");
        ``TaskStates`` keep what the client last reported; poststop never runs.
        """
        runner = self.runners.get(alloc_id)

        def write(index: int) -> list[Change]:
            alloc = self.state.allocs.get(alloc_id)
            if alloc is None or alloc["ClientStatus"] in records.TERMINAL_CLIENT:
                return []
            alloc["ClientStatus"] = "lost"
            alloc["ClientDescription"] = ""
            alloc["DesiredStatus"] = "stop"
            alloc["DesiredDescription"] = "alloc is lost since its node is down"
            alloc["AllocModifyIndex"] = index
            changes = [self._alloc_change(alloc)]
            self._refresh_job(alloc["Namespace"], alloc["JobID"], changes)
            return changes

        self.state.commit(write)
        if runner is not None:
            runner.lose()

    # -- reads --------------------------------------------------------------------
    def alloc_stubs(self, ns: str, job_id: str) -> list[JSON]:
        with self.state.lock:
            allocs = sorted(self.state.allocs_of_job(ns, job_id), key=lambda a: -a["CreateIndex"])
            return [{f: copy.deepcopy(a.get(f)) for f in records.STUB_FIELDS} for a in allocs]

    def get_alloc(self, alloc_id: str) -> JSON:
        with self.state.lock:
            alloc = self.state.allocs.get(alloc_id)
            if alloc is None:
                matches = [a for i, a in self.state.allocs.items() if i.startswith(alloc_id)]
                if len(matches) != 1 or len(alloc_id) < 2:
                    raise ApiError(404, "alloc not found")
                alloc = matches[0]
            return copy.deepcopy(alloc)

    def get_eval(self, eval_id: str) -> JSON:
        with self.state.lock:
            ev = self.state.evals.get(eval_id)
            if ev is None:
                raise ApiError(404, "eval not found")
            return copy.deepcopy(ev)

    def job_evals(self, ns: str, job_id: str) -> list[JSON]:
        with self.state.lock:
            evals = sorted(self.state.evals_of_job(ns, job_id), key=lambda e: -e["CreateIndex"])
            return copy.deepcopy(evals)

    # -- GC and shutdown ---------------------------------------------------------
    def gc(self) -> None:
        """``PUT /v1/system/gc``: drop dead dispatched jobs, terminal allocs and their dirs."""
        doomed: list[AllocRunner] = []

        def write(index: int) -> list[Change]:
            changes: list[Change] = []
            for alloc_id, alloc in list(self.state.allocs.items()):
                runner = self.runners.get(alloc_id)
                if alloc["ClientStatus"] in records.TERMINAL_CLIENT and (
                    runner is None or not runner.is_alive()
                ):
                    del self.state.allocs[alloc_id]
                    changes.append(self._alloc_change(alloc))
                    if runner is not None:
                        doomed.append(self.runners.pop(alloc_id))
            for key, job in list(self.state.jobs.items()):
                if job["Status"] == "dead" and not self.state.allocs_of_job(*key):
                    del self.state.jobs[key]
                    self.payloads.pop(key, None)
                    changes.append(Change("jobs", key, [("jobs_list",)]))
                    for ev in self.state.evals_of_job(*key):
                        del self.state.evals[ev["ID"]]
                        changes.append(self._eval_change(ev))
            return changes

        self.state.commit(write)
        for runner in doomed:
            runner.destroy()

    def _client_gc_loop(self) -> None:
        while not self._gc_stop.wait(self._gc_interval_s):
            self.client_gc()

    def client_gc(self) -> None:
        """``keepUsageBelowThreshold`` for the allocs-count reason only."""
        if self.client_gc_max_allocs is None:
            return
        doomed = []
        with self._gc_lock:
            while len(self.runners) > self.client_gc_max_allocs and self.finished:
                runner = self.runners.pop(self.finished.popleft(), None)
                if runner is not None:
                    doomed.append(runner)
        for runner in doomed:
            runner.destroy()

    def shutdown(self) -> None:
        """Stop the scheduler, kill every task, remove every container and alloc dir."""
        self.closing = True
        self._gc_stop.set()
        self._sync_stop.set()
        self._evals.put(None)
        for runner in list(self.runners.values()):
            runner.stop()
            for tr in runner.tasks.values():
                tr.kill_requested.set()
                tr.gate.set()
                if tr.container is not None:
                    runner.remove_container(tr.container)
        for runner in list(self.runners.values()):
            runner.join(timeout=10)
            runner.destroy()
        self.runners.clear()
