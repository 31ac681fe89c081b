"""One task of an allocation: lifecycle gate, container run, Nomad task events.

Sources: ``client/allocrunner/taskrunner/task_runner.go`` (event order,
killing), ``restarts/restarts.go`` (restart decisions and reasons),
``drivers/docker/handle.go`` (exit results: signal 0, "Docker container exited
with non-zero exit code: N", "OOM Killed"), ``nomad/structs/structs.go``
(``TaskEvent`` setters and ``PopulateEventDisplayMessage`` texts).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import TYPE_CHECKING, Any

import docker.errors

from .dockerconfig import ConfigError
from .jobspec import lifecycle_of

if TYPE_CHECKING:
    from .allocrunner import AllocRunner

__all__ = ["ZERO_TIME", "SetupError", "TaskRunner", "fmt_time", "go_duration", "new_event"]

JSON = dict[str, Any]
ZERO_TIME = "0001-01-01T00:00:00Z"


def fmt_time(ns: int) -> str:
    """Go's RFC3339Nano in UTC, as ``time.Time`` marshals to JSON."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    digits = f"{frac:09d}".rstrip("0")
    return f"{base}.{digits}Z" if digits else f"{base}Z"


def go_duration(ns: int) -> str:
    """Go's ``time.Duration.String`` for whole seconds and up (``5s``, ``24h0m0s``)."""
    secs = ns // 1_000_000_000
    if ns % 1_000_000_000:
        return f"{ns / 1_000_000_000:g}s"
    hours, rest = divmod(secs, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def new_event(kind: str, **fields: Any) -> JSON:
    """A ``TaskEvent`` with every field the API shows; ``display`` fills DisplayMessage."""
    details: dict[str, str] = fields.pop("details", {})
    display: str = fields.pop("display", "")
    event: JSON = {
        "Type": kind,
        "Time": time.time_ns(),
        "Message": "",
        "DisplayMessage": display,
        "Details": details,
        "FailsTask": False,
        "RestartReason": "",
        "SetupError": "",
        "DriverError": "",
        "DriverMessage": "",
        "ExitCode": 0,
        "Signal": 0,
        "KillReason": "",
        "KillTimeout": 0,
        "KillError": "",
        "StartDelay": 0,
        "DownloadError": "",
        "ValidationError": "",
        "DiskLimit": 0,
        "DiskSize": 0,
        "FailedSibling": "",
        "VaultError": "",
        "TaskSignalReason": "",
        "TaskSignal": "",
        "GenericSource": "",
    }
    event.update(fields)
    return event


class TaskRunner(threading.Thread):
    """One task: waits for its lifecycle gate, runs its container, records its state."""

    def __init__(self, alloc: AllocRunner, task: JSON) -> None:
        super().__init__(name=f"nomadsim-task-{task['Name']}", daemon=True)
        self.alloc = alloc
        self.task = task
        self.name_ = task["Name"]
        self.hook, self.sidecar = lifecycle_of(task)
        self.gate = threading.Event()
        self.kill_requested = threading.Event()
        self.exited = threading.Event()
        self.killing = False
        self.container: Any = None
        self.state: JSON = {
            "State": "pending",
            "Failed": False,
            "Restarts": 0,
            # Checked on Nomad 1.6.5: the HTTP API shows a time that has not happened
            # (a task never started, not finished, never restarted) as null.
            "LastRestart": None,
            "StartedAt": None,
            "FinishedAt": None,
            "Events": [new_event("Received", display="Task received by client")],
        }

    # -- state -------------------------------------------------------------
    @property
    def dead(self) -> bool:
        return bool(self.state["State"] == "dead")

    @property
    def failed(self) -> bool:
        return self.dead and bool(self.state["Failed"])

    def emit(self, event: JSON, **state: Any) -> None:
        with self.alloc.state_lock:
            self.state["Events"] = [*self.state["Events"], event]
            self.state.update(state)
            self.alloc.task_changed(self)

    def set_state(self, **state: Any) -> None:
        with self.alloc.state_lock:
            self.state.update(state)
            self.alloc.task_changed(self)

    # -- control -----------------------------------------------------------
    def kill(self, reason: JSON | None) -> None:
        """Ask the task to stop; the reason event (e.g. Sibling Task Failed) comes first."""
        if self.kill_requested.is_set():
            return
        if reason is not None:
            self.emit(reason)
        self.kill_requested.set()
        self.gate.set()
        if self.container is not None and not self.exited.is_set():
            threading.Thread(target=self._kill_container, daemon=True).start()

    def _kill_container(self) -> None:
        timeout_ns = int(self.task.get("KillTimeout") or 5_000_000_000)
        max_kill = self.alloc.sim.max_kill_timeout_ns
        timeout_ns = min(timeout_ns, max_kill)
        self.killing = True
        self.emit(
            new_event(
                "Killing",
                details={"kill_timeout": go_duration(timeout_ns)},
                KillTimeout=timeout_ns,
                display=f"Sent interrupt. Waiting {go_duration(timeout_ns)} before force killing",
            )
        )
        signal = self.task.get("KillSignal") or "SIGTERM"
        with contextlib.suppress(docker.errors.APIError):
            self.container.kill(signal=signal)
        if not self.exited.wait(timeout_ns / 1e9):
            with contextlib.suppress(docker.errors.APIError):
                self.container.kill(signal="SIGKILL")

    # -- run ---------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:
            self.emit(
                new_event(
                    "Driver Failure",
                    DriverError=str(exc),
                    display=str(exc),
                    details={"driver_error": str(exc)},
                ),
                State="dead",
                Failed=True,
                FinishedAt=fmt_time(time.time_ns()),
            )

    def _run(self) -> None:
        self.gate.wait()
        if self.kill_requested.is_set() or self.alloc.sim.closing:
            # guessed: a task killed before it started just turns dead, no Killing event.
            self.set_state(State="dead", FinishedAt=fmt_time(time.time_ns()))
            return
        self.emit(
            new_event(
                "Task Setup", Message="Building Task Directory", display="Building Task Directory"
            )
        )
        try:
            env = self.alloc.prepare_task_dir(self.task)
        except SetupError as exc:
            self._fail_setup(str(exc))
            return
        policy = self.task.get("RestartPolicy") or {}
        attempts = int(policy.get("Attempts") or 0)
        count = 0
        while True:
            try:
                container = self.alloc.create_container(self.task, env)
            except ConfigError as exc:
                msg = str(exc)
                self.emit(
                    new_event(
                        "Driver Failure",
                        DriverError=msg,
                        display=msg,
                        details={"driver_error": msg},
                    )
                )
                self._not_restarting("Error was unrecoverable")
                return
            except docker.errors.DockerException as exc:
                msg = f"failed to create container: {exc}"
                self.emit(
                    new_event(
                        "Driver Failure",
                        DriverError=msg,
                        display=msg,
                        details={"driver_error": msg},
                    )
                )
                self._not_restarting("Error was unrecoverable")
                return
            self.container = container
            self.exited.clear()
            # Attach before start (no log replay), so no output is lost or doubled.
            stream = container.attach(stdout=True, stderr=True, stream=True, logs=False, demux=True)
            logger = threading.Thread(
                target=self.alloc.copy_logs, args=(self.name_, stream), daemon=True
            )
            logger.start()
            container.start()
            self.emit(
                new_event("Started", display="Task started by client"),
                State="running",
                StartedAt=fmt_time(time.time_ns()) if count == 0 else self.state["StartedAt"],
            )
            if self.kill_requested.is_set() and not self.killing:
                threading.Thread(target=self._kill_container, daemon=True).start()
            code = int(container.wait().get("StatusCode", -1))
            self.exited.set()
            logger.join(timeout=10)
            with contextlib.suppress(docker.errors.APIError):
                container.reload()
            oom = bool(container.attrs.get("State", {}).get("OOMKilled"))
            message = ""
            if code != 0:
                message = f"Docker container exited with non-zero exit code: {code}"
            if oom:
                message = "OOM Killed"
            display = f"Exit Code: {code}"
            if message:
                display += f", Exit Message: {json.dumps(message)}"
            self.emit(
                new_event(
                    "Terminated",
                    details={
                        "exit_code": str(code),
                        "signal": "0",
                        "oom_killed": str(oom).lower(),
                        **({"exit_message": message} if message else {}),
                    },
                    ExitCode=code,
                    Message=message,
                    display=display,
                )
            )
            self.alloc.remove_container(container)
            self.container = None
            if self.kill_requested.is_set():
                self.emit(
                    new_event("Killed", display="Task successfully killed"),
                    State="dead",
                    FinishedAt=fmt_time(time.time_ns()),
                )
                return
            if code == 0 and not oom:
                self.set_state(State="dead", FinishedAt=fmt_time(time.time_ns()))
                return
            if attempts == 0:
                self._not_restarting("Policy allows no restarts")
                return
            count += 1
            if count > attempts:
                interval = go_duration(int(policy.get("Interval") or 0))
                self._not_restarting(
                    f"Exceeded allowed attempts {attempts} in interval {interval}"
                    ' and mode is "fail"'
                )
                return
            delay = int(policy.get("Delay") or 0)
            self.emit(
                new_event(
                    "Restarting",
                    RestartReason="Restart within policy",
                    StartDelay=delay,
                    details={"restart_reason": "Restart within policy", "start_delay": str(delay)},
                    display=f"Restart within policy - Task restarting in {go_duration(delay)}",
                )
            )
            if self.kill_requested.wait(delay / 1e9):
                self.emit(
                    new_event("Killed", display="Task successfully killed"),
                    State="dead",
                    FinishedAt=fmt_time(time.time_ns()),
                )
                return
            self.set_state(
                Restarts=self.state["Restarts"] + 1, LastRestart=fmt_time(time.time_ns())
            )

    def _not_restarting(self, reason: str) -> None:
        self.emit(
            new_event(
                "Not Restarting",
                RestartReason=reason,
                FailsTask=True,
                display=reason,
                details={"restart_reason": reason, "fails_task": "true"},
            ),
            State="dead",
            Failed=True,
            FinishedAt=fmt_time(time.time_ns()),
        )

    def _fail_setup(self, message: str) -> None:
        self.emit(
            new_event(
                "Setup Failure",
                SetupError=message,
                FailsTask=True,
                display=message,
                details={"setup_error": message, "fails_task": "true"},
            ),
            State="dead",
            Failed=True,
            FinishedAt=fmt_time(time.time_ns()),
        )


class SetupError(Exception):
    """The task directory could not be built (e.g. a template the sim cannot render)."""
