"""The sim's state store: jobs, evaluations, allocations, one raft-like index, events.

Every write goes through :meth:`State.commit`, which bumps the index, stamps
``ModifyIndex`` on what changed, records the events Nomad's state store would
publish (``nomad/state/events.go``) and wakes the HTTP side through listeners.
Writers are threads (the HTTP loop, alloc runners), so one lock guards it all.

Index semantics follow Nomad: each table (``jobs``, ``evals``, ``allocs``) has
its own "last index that touched this table" (``state.Index("allocs")`` in
``nomad/job_endpoint.go``), and list endpoints answer with that table index,
not with the index of the rows they return.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Change", "State"]

JSON = dict[str, Any]
Listener = Callable[[int, "list[Change]", "list[JSON]"], None]

# Nomad's server option event_buffer_size defaults to 100 (raft indexes kept).
EVENT_BUFFER = 100


class Change:
    """One row written in a commit: (table, key) plus the watch keys it wakes."""

    __slots__ = ("key", "table", "watch")

    def __init__(self, table: str, key: Any, watch: Iterable[Any] = ()) -> None:
        self.table = table
        self.key = key
        self.watch = (("table", table), (table, key), *watch)


class State:
    """Thread-safe tables keyed like Nomad's: jobs by (namespace, id), evals/allocs by id."""

    def __init__(self, event_buffer: int = EVENT_BUFFER) -> None:
        self.lock = threading.RLock()
        self.index = 1
        self.table_index: dict[str, int] = {"jobs": 1, "evals": 1, "allocs": 1}
        self.jobs: dict[tuple[str, str], JSON] = {}
        self.evals: dict[str, JSON] = {}
        self.allocs: dict[str, JSON] = {}
        self.events: deque[tuple[int, list[JSON]]] = deque(maxlen=event_buffer)
        self._listeners: list[Listener] = []

    # -- listeners ---------------------------------------------------------
    def listen(self, listener: Listener) -> None:
        with self.lock:
            self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        with self.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # -- writes ------------------------------------------------------------
    def commit(self, write: Callable[[int], list[Change]]) -> int:
        """Run ``write(index)`` under the lock; it mutates rows and names what changed."""
        with self.lock:
            index = self.index + 1
            changes = write(index)
            if not changes:
                return self.index
            self.index = index
            now = time.time_ns()
            events: list[JSON] = []
            for change in changes:
                self.table_index[change.table] = index
                row = self._row(change)
                if row is not None:
                    row["ModifyIndex"] = index
                    if change.table == "allocs":
                        row["ModifyTime"] = now
                    if change.table == "evals":
                        row["ModifyTime"] = now
                event = self._event(change, row, index)
                if event is not None:
                    events.append(event)
            if events:
                self.events.append((index, events))
            listeners = list(self._listeners)
        for listener in listeners:
            listener(index, changes, events)
        return index

    def _row(self, change: Change) -> JSON | None:
        if change.table == "jobs":
            return self.jobs.get(change.key)
        if change.table == "evals":
            return self.evals.get(change.key)
        return self.allocs.get(change.key)

    def _event(self, change: Change, row: JSON | None, index: int) -> JSON | None:
        """An event shaped like ``eventFromChange`` in nomad/state/events.go."""
        if change.table == "jobs":
            ns, job_id = change.key
            job = row if row is not None else {"ID": job_id, "Namespace": ns}
            return {
                "Topic": "Job",
                "Type": "JobRegistered" if row is not None else "JobDeregistered",
                "Key": job_id,
                "Namespace": ns,
                "FilterKeys": None,
                "Index": index,
                "Payload": {"Job": copy.deepcopy(job)},
            }
        if row is None:
            return None  # GC of evals/allocs publishes nothing (events.go ignores deletes)
        if change.table == "evals":
            return {
                "Topic": "Evaluation",
                "Type": "EvaluationUpdated",
                "Key": row["ID"],
                "Namespace": row["Namespace"],
                "FilterKeys": [row["JobID"], row.get("DeploymentID", "")],
                "Index": index,
                "Payload": {"Evaluation": copy.deepcopy(row)},
            }
        alloc = {k: copy.deepcopy(v) for k, v in row.items() if k != "Job"}
        alloc["Job"] = None  # events.go drops the job to keep alloc events small
        return {
            "Topic": "Allocation",
            # AllocationUpdated for client updates; PlanResult when the plan placed it.
            "Type": "PlanResult" if row.get("CreateIndex") == index else "AllocationUpdated",
            "Key": row["ID"],
            "Namespace": row["Namespace"],
            "FilterKeys": [row["JobID"], row.get("DeploymentID", "")],
            "Index": index,
            "Payload": {"Allocation": alloc},
        }

    # -- reads -------------------------------------------------------------
    def events_from(self, index: int) -> list[tuple[int, list[JSON]]]:
        """``eventBuffer.StartAtClosest``: index 0 replays the buffer, N starts at >= N."""
        with self.lock:
            return [(i, evs) for i, evs in self.events if i >= index]

    def allocs_of_job(self, ns: str, job_id: str) -> list[JSON]:
        with self.lock:
            return [
                a for a in self.allocs.values() if a["JobID"] == job_id and a["Namespace"] == ns
            ]

    def evals_of_job(self, ns: str, job_id: str) -> list[JSON]:
        with self.lock:
            return [e for e in self.evals.values() if e["JobID"] == job_id and e["Namespace"] == ns]
