"""Runs one allocation's task group for real on the Docker daemon, like a Nomad client.

Sources: ``client/allocrunner/alloc_runner.go`` (``getClientStatus``, sibling
kills, lifecycle ordering), ``client/allocrunner/taskrunner/task_runner.go``
and ``restarts/restarts.go`` (task events, restart decisions),
``drivers/docker/driver.go`` + ``handle.go`` (container settings, exit
results), ``nomad/structs/structs.go`` (``TaskEvent`` setters, display texts).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors

from .dockerconfig import ConfigError, blocks, container_kwargs
from .jobspec import interpolate, interpolate_deep, lifecycle_of, task_env

__all__ = ["ZERO_TIME", "AllocRunner", "fmt_time"]

JSON = dict[str, Any]
ZERO_TIME = "0001-01-01T00:00:00Z"
SIM_LABEL = "nomadsim"


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


def _signal_number(name: str) -> int:
    import signal as _signal

    return int(getattr(_signal, name, _signal.SIGTERM))


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
            "LastRestart": ZERO_TIME,
            "StartedAt": ZERO_TIME,
            "FinishedAt": ZERO_TIME,
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


def client_status(states: dict[str, JSON]) -> tuple[str, str]:
    """``getClientStatus`` in client/allocrunner/alloc_runner.go, verbatim logic."""
    flags = {"pending": False, "running": False, "dead": False, "failed": False}
    for state in states.values():
        if state["State"] == "dead":
            flags["failed" if state["Failed"] else "dead"] = True
        else:
            flags[state["State"]] = True
    if flags["failed"]:
        return "failed", "Failed tasks"
    if flags["running"]:
        return "running", "Tasks are running"
    if flags["pending"]:
        return "pending", "No tasks have started"
    if flags["dead"]:
        return "complete", "All tasks have completed"
    return "", ""


class AllocRunner(threading.Thread):
    """Drives the lifecycle phases of one alloc and reports task states to the sim."""

    def __init__(self, sim: Any, alloc: JSON, job: JSON, payload: bytes) -> None:
        super().__init__(name=f"nomadsim-alloc-{alloc['ID'][:8]}", daemon=True)
        self.sim = sim
        self.alloc_id: str = alloc["ID"]
        self.alloc = alloc
        self.job = job
        self.group = next(g for g in job["TaskGroups"] if g["Name"] == alloc["TaskGroup"])
        self.payload = payload
        self.root = Path(sim.data_dir) / self.alloc_id
        self.changed = threading.Condition()
        # Task threads and kill threads both write task states; one writer at a time.
        self.state_lock = threading.RLock()
        self.stop_requested = False
        self.lost = False
        self.tasks = {t["Name"]: TaskRunner(self, t) for t in self.group["Tasks"]}
        self.on_done: Callable[[str], None] | None = None

    # -- reporting ---------------------------------------------------------
    def task_changed(self, runner: TaskRunner) -> None:
        with self.state_lock:
            states = {name: tr.state for name, tr in self.tasks.items()}
            self.sim.update_task_states(self.alloc_id, states, *client_status(states))
        with self.changed:
            self.changed.notify_all()

    def lose(self) -> None:
        """The node died: containers vanish at once, nothing else runs."""
        with self.changed:
            self.lost = True
            self.stop_requested = True
            self.changed.notify_all()
        for tr in self.tasks.values():
            tr.kill_requested.set()
            tr.gate.set()
            if tr.container is not None:
                self.remove_container(tr.container)

    def stop(self) -> None:
        """Operator stop (job deregister): kill the tasks, then run poststop."""
        with self.changed:
            self.stop_requested = True
            self.changed.notify_all()

    def _wait(self, done: Callable[[], bool]) -> None:
        with self.changed:
            while not done():
                self.changed.wait(timeout=1.0)

    # -- phases ------------------------------------------------------------
    def run(self) -> None:
        runners = list(self.tasks.values())
        self._build_alloc_dir()
        for tr in runners:
            tr.start()
        self.task_changed(runners[0])
        by_hook: dict[str, list[TaskRunner]] = {}
        for tr in runners:
            by_hook.setdefault(tr.hook, []).append(tr)
        pre = [t for t in by_hook.get("prestart", []) if not t.sidecar]
        side = [t for t in runners if t.sidecar]
        main = by_hook.get("main", [])
        poststart = by_hook.get("poststart", [])
        post = by_hook.get("poststop", [])
        nonpost = [t for t in runners if t.hook != "poststop"]

        def failed() -> TaskRunner | None:
            return next((t for t in nonpost if t.failed), None)

        for tr in (*pre, *(t for t in side if t.hook == "prestart")):
            tr.gate.set()
        self._wait(lambda: self.stop_requested or failed() is not None or all(t.dead for t in pre))
        if not self.stop_requested and failed() is None:
            for tr in (*main, *poststart):
                tr.gate.set()
            self._wait(
                lambda: self.stop_requested or failed() is not None or all(t.dead for t in main)
            )
        # Kill whatever of the non-poststop tasks is still alive, with Nomad's reason.
        culprit = failed()
        for tr in nonpost:
            if tr.dead:
                continue
            reason: JSON | None = None
            if culprit is not None:
                reason = new_event(
                    "Sibling Task Failed",
                    FailedSibling=culprit.name_,
                    details={"failed_sibling": culprit.name_},
                    display=f'Task\'s sibling "{culprit.name_}" failed',
                )
            elif not self.stop_requested:
                reason = new_event("Main Tasks Dead", display="Main tasks in the group died")
            tr.kill(reason)
        self._wait(lambda: all(t.dead for t in nonpost))
        # poststop runs once every other task is dead, failed or not, stop or not.
        for tr in post:
            if self.lost:
                tr.kill(None)
            tr.gate.set()
        self._wait(lambda: all(t.dead for t in post))
        for tr in runners:
            tr.join(timeout=5)
        if self.on_done is not None:
            self.on_done(self.alloc_id)

    # -- filesystem ----------------------------------------------------------
    def _build_alloc_dir(self) -> None:
        """allocdir layout: ``alloc/{logs,data,tmp}`` shared, ``<task>/{local,secrets,tmp}``."""
        for sub in ("alloc", "alloc/logs", "alloc/data", "alloc/tmp"):
            path = self.root / sub
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o777)
        for name in self.tasks:
            for sub in ("local", "secrets", "tmp"):
                path = self.root / name / sub
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)

    def log_path(self, task: str, kind: str) -> Path:
        return self.root / "alloc" / "logs" / f"{task}.{kind}.0"

    def prepare_task_dir(self, task: JSON) -> dict[str, str]:
        env = task_env(self.alloc, self.job, self.group, task, self.sim.node)
        task_dir = self.root / task["Name"]
        dispatch = task.get("DispatchPayload") or {}
        if dispatch.get("File"):
            dest = task_dir / "local" / dispatch["File"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.payload)
            dest.chmod(0o644)
        for tmpl in task.get("Templates") or []:
            self._render_template(task_dir, tmpl, env)
        for kind in ("stdout", "stderr"):
            self.log_path(task["Name"], kind).touch()
        return env

    def _render_template(self, task_dir: Path, tmpl: JSON, env: dict[str, str]) -> None:
        """Only action-free templates: the sim has no consul-template engine."""
        text = tmpl.get("EmbeddedTmpl") or ""
        left = tmpl.get("LeftDelim") or "{{"
        right = tmpl.get("RightDelim") or "}}"
        if tmpl.get("SourcePath"):
            raise SetupError("nomadsim: template source files are not supported")
        if left in text or right in text:
            raise SetupError(
                "nomadsim: template actions are not supported (only literal templates render)"
            )
        dest_rel = interpolate(tmpl.get("DestPath") or "", env, self.sim.node)
        dest = (task_dir / dest_rel).resolve()
        if not str(dest).startswith(str(task_dir.resolve())):
            # Nomad refuses templates that escape the task dir (template.go, sandboxing).
            raise SetupError(f"template destination {dest_rel!r} escapes the task directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        dest.chmod(int(tmpl.get("Perms") or "0644", 8))

    # -- docker --------------------------------------------------------------
    def create_container(self, task: JSON, env: dict[str, str]) -> Any:
        cfg = interpolate_deep(task.get("Config") or {}, env, self.sim.node)
        kwargs = container_kwargs(task, cfg, env, self.root / "alloc", self.root / task["Name"])
        labels: dict[str, str] = {}
        for item in blocks(cfg.get("labels")):
            labels.update({str(k): str(v) for k, v in item.items()})
        labels |= {
            SIM_LABEL: "1",
            f"{SIM_LABEL}.sim": self.sim.sim_id,
            "com.hashicorp.nomad.alloc_id": self.alloc_id,
            "com.hashicorp.nomad.job_name": self.job["ID"],
            "com.hashicorp.nomad.task_name": task["Name"],
            "com.hashicorp.nomad.task_group_name": self.group["Name"],
            "com.hashicorp.nomad.namespace": self.job["Namespace"],
        }
        # drivers/docker/driver.go names containers <task>-<alloc id>.
        name = f"{task['Name']}-{self.alloc_id}"
        return self.sim.docker.containers.create(name=name, labels=labels, **kwargs)

    def copy_logs(self, task: str, stream: Any) -> None:
        """Demultiplex the container's output into ``alloc/logs/<task>.{stdout,stderr}.0``."""
        with (
            self.log_path(task, "stdout").open("ab") as out,
            self.log_path(task, "stderr").open("ab") as err,
        ):
            try:
                for chunk_out, chunk_err in stream:
                    if chunk_out:
                        out.write(chunk_out)
                        out.flush()
                    if chunk_err:
                        err.write(chunk_err)
                        err.flush()
            except docker.errors.APIError:
                return
            finally:
                # CancellableStream.close shuts the socket but leaves http.client's reader
                # holding it (a ResourceWarning); closing that reader too releases it.
                stream.close()
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    stream._response.raw._fp.close()

    def remove_container(self, container: Any) -> None:
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)

    def destroy(self) -> None:
        """GC: kill leftovers and remove the alloc dir."""
        for tr in self.tasks.values():
            if tr.container is not None:
                self.remove_container(tr.container)
        shutil.rmtree(self.root, ignore_errors=True)
