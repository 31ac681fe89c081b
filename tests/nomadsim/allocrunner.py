"""Runs one allocation's task group for real on the Docker daemon, like a Nomad client.

Sources: ``client/allocrunner/alloc_runner.go`` (``getClientStatus``, sibling
kills, lifecycle ordering), ``client/allocdir`` (directory layout),
``drivers/docker/driver.go`` (container names and labels).
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import httpx

from . import consultmpl
from .dockerconfig import blocks, container_kwargs
from .jobspec import interpolate, interpolate_deep, task_env
from .taskrunner import SetupError, TaskRunner, new_event

__all__ = ["SIM_LABEL", "AllocRunner", "client_status"]

JSON = dict[str, Any]
SIM_LABEL = "nomadsim"


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
        self.root: Path = Path(sim.data_dir) / self.alloc_id
        self.changed = threading.Condition()
        # Task threads and kill threads both write task states; one writer at a time.
        self.state_lock = threading.RLock()
        self.stop_requested = False
        self.lost = False
        self.tasks = {t["Name"]: TaskRunner(self, t) for t in self.group["Tasks"]}
        self.on_done: Callable[[str], None] | None = None
        #: Ends the template watchers (``consultmpl.watch``) when the allocation is over.
        self.templates_done = threading.Event()

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
        self.templates_done.set()
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
        """Literal templates, and the few Consul actions ``consultmpl`` knows, rendered
        with the client's Consul (the node's 127.0.0.1:8500 unless the sim was given one)."""
        text = tmpl.get("EmbeddedTmpl") or ""
        left = tmpl.get("LeftDelim") or "{{"
        right = tmpl.get("RightDelim") or "}}"
        if tmpl.get("SourcePath"):
            raise SetupError("nomadsim: template source files are not supported")
        if tmpl.get("Envvars"):
            raise SetupError("nomadsim: env templates are not supported")
        source = data = text.encode("utf-8", "surrogateescape")
        watched = False
        if left in text or right in text:
            if (left, right) != ("{{", "}}"):
                raise SetupError("nomadsim: template actions need the default delimiters")
            try:
                data = consultmpl.render(data, self.sim.consul_addr, env)
            except (consultmpl.TemplateError, httpx.HTTPError) as exc:
                raise SetupError(f"nomadsim: template: {exc}") from None
            if (tmpl.get("ChangeMode") or "restart") != "noop":
                raise SetupError("nomadsim: only change_mode noop is supported for Consul data")
            watched = True
        dest_rel = interpolate(tmpl.get("DestPath") or "", env, self.sim.node)
        dest = (task_dir / dest_rel).resolve()
        if not str(dest).startswith(str(task_dir.resolve())):
            # Nomad refuses templates that escape the task dir (template.go, sandboxing).
            raise SetupError(f"template destination {dest_rel!r} escapes the task directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        mode = int(tmpl.get("Perms") or "0644", 8)
        consultmpl.write_atomic(dest, data, mode)
        if watched:  # rendered again when its keys change, as the client does
            threading.Thread(
                target=consultmpl.watch,
                args=(source, self.sim.consul_addr, env),
                kwargs={
                    "write": lambda new: consultmpl.write_atomic(dest, new, mode),
                    "stop": self.templates_done,
                    "first": data,
                },
                name=f"nomadsim-template-{self.alloc_id[:8]}",
                daemon=True,
            ).start()

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
        self.templates_done.set()
        for tr in self.tasks.values():
            if tr.container is not None:
                self.remove_container(tr.container)
        shutil.rmtree(self.root, ignore_errors=True)
