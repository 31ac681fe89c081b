"""The ``run`` task of pyexec's Nomad runner job: check the tar, unpack it, run the program.

Runs as ``python3 -I -S /local/pyexec/nomad_run.py`` in the image the request names,
with no network. ``pyexec.runner.nomad_job`` ships it as a template, beside
``pyexec/sandbox/tarcheck.py`` (the tar rules the API applies), both unchanged; this
file loads the rules into its own namespace before ``main()``. Built-in modules and
``tarfile`` only, Python 3.8+ syntax.

The Nomad client renders the inputs into ``/local`` from Consul before the task starts,
with its own Consul access (the task holds no token and has no network):

    bundle.tar      the execution's tar chunks, concatenated
    manifest.json   the tar's size and sha256 (written by the service last)
    record.json     the execution's record, with the request

The task checks the tar against the manifest, unpacks it into ``/work`` member by member
through ``TarChecker`` (the same rules as the upload check), runs the pre-commands
(without network), then the entrypoint, keeping at most ``max_output_bytes`` of each
stream. It writes, into the allocation's ``data/pyexec`` directory:

    stdout, stderr  the captured output (capped)
    artifacts.tar   the output files the request's ``artifacts`` patterns match, collected
                    once the program and everything it started are gone, whatever the
                    verdict (``pyexec/sandbox/collect.py``, shipped beside this file)
    verdict.json    written last, atomically: reason, exit_code, times, error

The service reads those files through Nomad's client filesystem API as soon as they
are there; the poststop ``finish`` task reads them to store a plain dispatch's record.

``PYEXEC_PHASE`` splits the work when the operator gives pre-commands the network
(``PYEXEC_SETUP_NETWORK=true``, jobs ``<class>[-pip]-setup``):

    all     (default) everything above, in the network-less run task
    setup   the prestart ``setup`` task (the request's image, with network): unpack the
            tar, wait for the installer if there is one, run the pre-commands, then pack
            ``/work`` into ``data/pyexec/setup/work.tar`` and write ``setup.json``
            (``ok``, ``error``, ``output``, ``seconds``) last; always exits 0
    run     the run task after it (no network): unpack ``work.tar`` into its own tmpfs
            ``/work`` with the same tar rules, then run the entrypoint

``PYEXEC_POOL_WAIT_SECONDS`` marks a warm-pool slot (``pyexec.runner.nomad_pool``): the
task starts before it has an execution, its inputs rendered empty, and waits for
``record.json`` to appear (the client re-renders the templates when the service
writes the slot's keys in Consul), then for the tar to reach the manifest's size;
from there on it is the run above, unchanged. Unclaimed for that long, it exits 0
and leaves no verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tarfile
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # In the task, tarcheck.py's and collect.py's sources follow this file's.
    from pyexec.sandbox.collect import write_artifacts
    from pyexec.sandbox.tarcheck import (
        DIR,
        FILE,
        HARDLINK,
        SYMLINK,
        TarChecker,
        TarProblem,
        member_kind,
    )

LOCAL = os.environ.get("NOMAD_TASK_DIR", "/local")
ALLOC = os.environ.get("NOMAD_ALLOC_DIR", "/alloc")
#: Where the run's results go: alloc/data is shared by the allocation's tasks.
OUT = os.path.join(ALLOC, "data", "pyexec")
#: Requirements installed by the trusted installer task, if the job has one.
SITE = os.path.join(OUT, "site")
#: What the setup task hands to the run task (``PYEXEC_PHASE``).
HANDOFF = os.path.join(OUT, "setup")
#: Waiting for the installer's result (setup task of a ``-pip-setup`` job): the pause.
INSTALL_POLL_SECONDS = 0.05
#: The tmpfs the program runs in (a setting only so tests can run the task on a host).
WORK = os.environ.get("PYEXEC_WORK_DIR", "/work")
TERMINAL = ("completed", "failed", "killed")
#: Setup output kept (from the end) when a pre-command fails.
SETUP_OUTPUT_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 300.0
DEFAULT_CAP = 1024 * 1024
DEFAULT_ARTIFACT_CAP = 16 * 1024 * 1024
#: Most artifact files (``pyexec.artifacts.MAX_ARTIFACT_FILES``; the service checks again).
MAX_ARTIFACT_FILES = 1000
#: A pool slot looking for its assignment: the pause between looks.
ASSIGNMENT_POLL_SECONDS = 0.005
#: After the record, how long the rest of the inputs may take to be rendered.
INPUTS_WAIT_SECONDS = 30.0


class SetupFailed(Exception):
    """The program cannot start; ``output`` is what the failing step printed."""

    def __init__(self, message: str, output: bytes = b"") -> None:
        super().__init__(message)
        self.output = output


class AlreadyOver(Exception):
    """The record is terminal already: nothing runs."""


def now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def write_json(path: str, value: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh)
    os.replace(tmp, path)


def read_json(path: str) -> dict[str, Any] | None:
    """A small JSON object from a file of the allocation, or ``None``."""
    try:
        with open(path, "rb") as fh:
            value = json.loads(fh.read(1024 * 1024))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_local(name: str) -> bytes:
    try:
        with open(os.path.join(LOCAL, name), "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def load_request() -> dict[str, Any]:
    """The request from the record the Nomad client rendered."""
    raw = read_local("record.json")
    if not raw.strip():
        raise SetupFailed("the execution has no record in Consul")
    record = json.loads(raw)
    if record.get("status") in TERMINAL:
        raise AlreadyOver(str(record["status"]))
    request = record.get("request")
    if not isinstance(request, dict):
        raise SetupFailed("the execution's record holds no request")
    return request


def load_inputs() -> tuple[dict[str, Any], str]:
    """(request, tar path): the record and the tar as the Nomad client rendered them."""
    request = load_request()
    manifest_raw = read_local("manifest.json")
    if not manifest_raw.strip():
        raise SetupFailed("the execution's tar is not in Consul (no manifest)")
    manifest = json.loads(manifest_raw)
    path = os.path.join(LOCAL, "bundle.tar")
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(block)
            size += len(block)
    if size != int(manifest["size"]) or digest.hexdigest() != manifest["sha256"]:
        raise SetupFailed(
            f"the tar does not match its manifest ({size} bytes, expected {manifest['size']})"
        )
    return request, path


def extract(path: str, limits: dict[str, int]) -> None:
    """Unpack the tar into /work, each member through ``TarChecker`` before anything of it
    is written (the rules of the upload check; a later member never writes through a
    symlink, links never leave /work)."""
    checker = TarChecker(limits["max_entries"], limits["max_bytes"])
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            kind = member_kind(member)
            name = checker.add(
                member.name, kind, member.size if kind == FILE else 0, member.linkname
            )
            if name is None:
                continue
            target = WORK + "/" + name
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if kind == DIR:
                os.makedirs(target, mode=(member.mode & 0o755) | 0o700, exist_ok=True)
                continue
            if os.path.lexists(target) and not os.path.isdir(target):
                os.unlink(target)  # a repeated name: the later member wins
            if kind == SYMLINK:
                os.symlink(member.linkname, target)
            elif kind == HARDLINK:
                os.link(
                    WORK + "/" + checker.normalize(member.linkname), target, follow_symlinks=False
                )
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(target, flags, (member.mode & 0o755) | 0o600)
                with os.fdopen(fd, "wb") as out:
                    source = archive.extractfile(member)
                    if source is not None:
                        while True:
                            block = source.read(256 * 1024)
                            if not block:
                                break
                            out.write(block)


def base_env(request: dict[str, Any]) -> dict[str, str]:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": WORK,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        # Output goes out as it is printed (live output), as on the local runner.
        "PYTHONUNBUFFERED": "1",
    }
    if os.path.isdir(SITE):
        env["PYTHONPATH"] = SITE
        env["PATH"] = SITE + "/bin:" + env["PATH"]
    cached = cached_site()
    if cached is not None:
        env["PYTHONPATH"] = cached
        env["PATH"] = cached + "/bin:" + env["PATH"]
    for item in request.get("env_vars") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    return env


#: The use lock of the cached environment this task runs with (held until it exits).
_DEPS_LOCK: list[int] = []


def cached_site() -> str | None:
    """The cached environment the installer handed over (``pyexec.deps``: the node's host
    volume, mounted read-only here), held in use so that no eviction removes it."""
    installed = read_json(os.path.join(OUT, "install.json")) or {}
    site, lock = installed.get("deps_site"), installed.get("deps_lock")
    if not isinstance(site, str) or not isinstance(lock, str) or not os.path.isdir(site):
        return None
    if not _DEPS_LOCK:
        import fcntl

        with contextlib.suppress(OSError):
            fd = os.open(lock, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)  # a read-only file takes a shared lock too
            _DEPS_LOCK.append(fd)
    return site


def deps_cache() -> str | None:
    """``hit``/``miss`` (the installer's cache), ``off`` (it installed for this run alone),
    ``None`` without an installer."""
    installed = read_json(os.path.join(OUT, "install.json"))
    if installed is None or installed.get("ok") is not True or installed.get("empty"):
        return None
    status = installed.get("deps_cache")
    return status if status in ("hit", "miss") else "off"


def pre_commands(request: dict[str, Any], env: dict[str, str], deadline: float) -> None:
    for command in request.get("pre_commands") or []:
        command = str(command)
        try:
            proc = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=WORK,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=max(deadline - time.monotonic(), 0.001),
                start_new_session=True,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SetupFailed(f"setup timed out during {command!r}", exc.output or b"") from None
        if proc.returncode != 0:
            raise SetupFailed(
                f"setup step {command!r} failed with exit code {proc.returncode}", proc.stdout
            )


def oom_kills() -> int:
    """OOM kills in this container's memory cgroup so far (v2, then v1)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path, encoding="ascii") as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return 0


class Capture:
    """One stream of the program: kept in its capture file and echoed to the task's own
    stream (for ``nomad alloc logs``), up to ``cap`` bytes; past it, ``over`` is set."""

    def __init__(self, path: str, echo: int, cap: int) -> None:
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.echo, self.cap, self.count, self.over = echo, cap, 0, False

    def feed(self, data: bytes) -> None:
        room = self.cap - self.count
        if len(data) > room:
            data = data[: max(room, 0)]
            self.over = True
        if data:
            self.count += len(data)
            self.file.write(data)
            self.file.flush()
            with contextlib.suppress(OSError):
                os.write(self.echo, data)

    def close(self) -> None:
        self.file.close()


def run_program(
    request: dict[str, Any], env: dict[str, str], deadline: float, cap: int
) -> dict[str, Any]:
    """Run the entrypoint, feeding stdin and capturing both streams in one thread (no
    threads at all: gVisor's runsc on the ptrace platform cannot start any here)."""
    argv = ["python3", str(request.get("entrypoint") or "main.py")]
    argv += [str(a) for a in request.get("script_args") or []]
    stdin = str(request.get("stdin") or "").encode("utf-8")
    oom_before = oom_kills()
    started = now_iso()
    stopped = []

    proc = subprocess.Popen(
        argv,
        cwd=WORK,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def kill_group() -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)

    def on_term(*_: object) -> None:
        stopped.append(True)
        kill_group()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    captures = {
        proc.stdout.fileno(): Capture(os.path.join(OUT, "stdout"), 1, cap),
        proc.stderr.fileno(): Capture(os.path.join(OUT, "stderr"), 2, cap),
    }
    selector = selectors.DefaultSelector()
    for fd in captures:
        selector.register(fd, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    if stdin:
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    pending = memoryview(stdin)
    timed_out = False
    drain_until = None
    while selector.get_map():
        over = any(c.over for c in captures.values())
        now = time.monotonic()
        if (over or stopped) and drain_until is None:
            kill_group()
            drain_until = now + 5
        elif now >= deadline and drain_until is None:
            timed_out = True
            kill_group()
            drain_until = now + 5
        elif drain_until is None and proc.poll() is not None:
            # The entrypoint is gone: whatever it left in its session goes too, and the
            # pipes close once nothing holds them.
            kill_group()
            drain_until = now + 5
        if drain_until is not None and now > drain_until:
            break
        for key, _ in selector.select(timeout=0.02):
            fd = key.fd
            if fd == stdin_fd:
                try:
                    pending = pending[os.write(fd, pending[:65536]) :]
                except OSError:  # the program closed its stdin
                    pending = pending[:0]
                if not pending:
                    selector.unregister(fd)
                    proc.stdin.close()
                continue
            data = os.read(fd, 65536)
            if data:
                captures[fd].feed(data)
            else:
                selector.unregister(fd)
    selector.close()
    kill_group()
    code = proc.wait()
    over = any(c.over for c in captures.values())
    for capture in captures.values():
        capture.close()
    exit_code = code if code >= 0 else 128 - code
    if stopped:
        reason = "killed"
    elif timed_out:
        reason = "timeout"
    elif over:
        reason = "output_limit"
    elif code < 0 and oom_kills() > oom_before:
        reason = "oom"
    else:
        reason = "exited"
    return {
        "reason": reason,
        "exit_code": exit_code,
        "started_at": started,
        "finished_at": now_iso(),
        "output_truncated": over,
    }


def collect_artifacts(request: dict[str, Any]) -> None:
    """The matched files into ``artifacts.tar`` (atomically), after ending every process the
    program left when this task is the container's first process (on a host, as tests run
    it, its session was killed already)."""
    patterns = [str(p) for p in request.get("artifacts") or []]
    if not patterns:
        return
    if os.getpid() == 1:
        with contextlib.suppress(OSError):
            os.kill(-1, signal.SIGKILL)  # every other process of the container
        end = time.monotonic() + 2.0
        with contextlib.suppress(ChildProcessError):  # none left
            while time.monotonic() < end:  # they are all this process's children now
                if not os.waitpid(-1, os.WNOHANG)[0]:
                    time.sleep(0.01)
    cap = int((request.get("config") or {}).get("max_artifact_bytes") or DEFAULT_ARTIFACT_CAP)
    path = os.path.join(OUT, "artifacts.tar")
    with open(path + ".tmp", "wb") as out:
        write_artifacts(out, WORK, patterns, cap, MAX_ARTIFACT_FILES)
    os.replace(path + ".tmp", path)


def tar_limits() -> dict[str, int]:
    return {
        "max_entries": int(os.environ.get("PYEXEC_MAX_TAR_ENTRIES") or 10000),
        "max_bytes": int(os.environ.get("PYEXEC_MAX_EXTRACTED_BYTES") or 1 << 30),
    }


def unpack(path: str, limits: dict[str, int], what: str = "the tar") -> None:
    try:
        extract(path, limits)
    except TarProblem as exc:
        raise SetupFailed(f"{what} was refused: {exc.message}") from None
    except OSError as exc:
        raise SetupFailed(f"unpacking {what} failed (over the disk limit?): {exc}") from None


def check_installed(deadline: float, wait: bool) -> None:
    """Fail with the installer's error if it failed; ``wait``: until it has answered."""
    path = os.path.join(OUT, "install.json")
    installed = read_json(path)
    while wait and installed is None and time.monotonic() < deadline:
        time.sleep(INSTALL_POLL_SECONDS)  # a prestart sibling: Nomad starts both at once
        installed = read_json(path)
    if wait and installed is None:
        raise SetupFailed("setup timed out waiting for the requirements installer")
    if installed is not None and installed.get("ok") is not True:
        output = str(installed.get("output") or "").encode("utf-8", "replace")
        raise SetupFailed(str(installed.get("error") or "installing requirements failed"), output)


def pack_work(path: str) -> None:
    """``/work`` as a tar, links kept as links (the run task applies the tar rules)."""
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(os.listdir(WORK)):
            archive.add(os.path.join(WORK, name), arcname=name)
    os.replace(tmp, path)


def setup_phase() -> None:
    """The prestart ``setup`` task: its result is ``setup.json``, never a verdict."""
    os.makedirs(HANDOFF, exist_ok=True)
    started = time.monotonic()
    result: dict[str, Any]
    try:
        request, path = load_inputs()
        timeout = float((request.get("config") or {}).get("timeout_seconds") or DEFAULT_TIMEOUT)
        deadline = started + timeout
        unpack(path, tar_limits())
        check_installed(deadline, wait=os.environ.get("PYEXEC_WAIT_INSTALL") == "1")
        pre_commands(request, base_env(request), deadline)
        pack_work(os.path.join(HANDOFF, "work.tar"))
        result = {"ok": True}
    except AlreadyOver as exc:
        result = {"ok": False, "error": str(exc), "skipped": True}
    except SetupFailed as exc:
        output = exc.output[-SETUP_OUTPUT_BYTES:].decode("utf-8", "replace")
        result = {"ok": False, "error": str(exc), "output": output}
        print(f"pyexec: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the run task reports whatever went wrong
        result = {"ok": False, "error": f"the setup task failed: {exc!r}", "output": ""}
        print(f"pyexec: {exc!r}", file=sys.stderr)
    result["seconds"] = time.monotonic() - started
    write_json(os.path.join(HANDOFF, "setup.json"), result)
    sys.exit(0)


def prepare(request: dict[str, Any], tar: str, deadline: float) -> float:
    """Make ``/work`` ready for the entrypoint; the deadline, less what setup took."""
    if os.environ.get("PYEXEC_PHASE") != "run":
        unpack(tar, tar_limits())
        check_installed(deadline, wait=False)
        pre_commands(request, base_env(request), deadline)
        return deadline
    check_installed(deadline, wait=False)
    done = read_json(os.path.join(HANDOFF, "setup.json"))
    if done is None:
        raise SetupFailed("the setup task left no result")
    if done.get("skipped") is True:
        raise AlreadyOver(str(done.get("error") or "over"))
    if done.get("ok") is not True:
        output = str(done.get("output") or "").encode("utf-8", "replace")
        raise SetupFailed(str(done.get("error") or "the setup task failed"), output)
    # What the pre-commands left is the requester's: the same tar rules as an upload,
    # bounded by the run task's /work rather than the upload limits.
    limits = {
        "max_entries": int(os.environ.get("PYEXEC_HANDOFF_MAX_ENTRIES") or 1 << 20),
        "max_bytes": int(os.environ.get("PYEXEC_WORK_BYTES") or 1 << 30),
    }
    unpack(os.path.join(HANDOFF, "work.tar"), limits, "what the pre-commands left in /work")
    return deadline - float(done.get("seconds") or 0.0)


def local_size(name: str) -> int:
    try:
        return os.stat(os.path.join(LOCAL, name)).st_size
    except OSError:
        return 0


def wait_for_assignment(limit: float) -> bool:
    """A pool slot: until its record is rendered (``False`` after ``limit`` seconds),
    then until the tar has the manifest's size (``load_inputs`` checks it fully; a tar
    that never completes fails it there, as on a cold run)."""
    give_up = time.monotonic() + limit
    while local_size("record.json") == 0:
        if time.monotonic() > give_up:
            return False
        time.sleep(ASSIGNMENT_POLL_SECONDS)
    inputs_by = time.monotonic() + INPUTS_WAIT_SECONDS
    while time.monotonic() < inputs_by:
        manifest = read_json(os.path.join(LOCAL, "manifest.json"))
        if manifest is not None and local_size("bundle.tar") == int(manifest.get("size", -1)):
            break
        time.sleep(ASSIGNMENT_POLL_SECONDS)
    return True


def main() -> None:
    if os.environ.get("PYEXEC_PHASE") == "setup":
        setup_phase()
    pool_wait = os.environ.get("PYEXEC_POOL_WAIT_SECONDS")
    if pool_wait and not wait_for_assignment(float(pool_wait)):
        print("pyexec: no execution was assigned to this pool slot", file=sys.stderr)
        sys.exit(0)
    os.makedirs(OUT, exist_ok=True)
    for name in ("stdout", "stderr"):
        open(os.path.join(OUT, name), "wb").close()
    verdict: dict[str, Any]
    try:
        if os.environ.get("PYEXEC_PHASE") == "run":
            request, path = load_request(), ""
        else:
            request, path = load_inputs()
        config = request.get("config") or {}
        timeout = float(config.get("timeout_seconds") or DEFAULT_TIMEOUT)
        cap = int(config.get("max_output_bytes") or DEFAULT_CAP)
        deadline = prepare(request, path, time.monotonic() + timeout)
        verdict = run_program(request, base_env(request), deadline, cap)
        try:
            collect_artifacts(request)
        except Exception as exc:  # noqa: BLE001 - the run's verdict stands without them
            print(f"pyexec: collecting artifacts failed: {exc!r}", file=sys.stderr)
    except AlreadyOver as exc:
        verdict = {"reason": "skipped", "error": f"the execution is already {exc}"}
    except SetupFailed as exc:
        with open(os.path.join(OUT, "stderr"), "wb") as err:
            err.write(exc.output[-SETUP_OUTPUT_BYTES:])
        verdict = {"reason": "setup_failed", "error": str(exc)}
        print(f"pyexec: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - any crash must still leave a verdict
        verdict = {"reason": "error", "error": f"the run task failed: {exc!r}"}
        print(f"pyexec: {exc!r}", file=sys.stderr)
    status = deps_cache()
    if status is not None:
        verdict["deps_cache"] = status
    write_json(os.path.join(OUT, "verdict.json"), verdict)
    sys.exit(0)


if __name__ == "__main__":
    # The tar rules and the artifact collector are the service's own modules, shipped
    # beside this file as they are.
    for module in ("tarcheck.py", "collect.py"):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), module)) as fh:
            exec(compile(fh.read(), module, "exec"))  # noqa: S102 - our own module
    main()
