"""The first process in a sandbox container: unpack the project, set it up, run it.

Runs as ``python3 -I -S -c <this file + tarcheck.py + "main()">`` (see
``pyexec.sandbox.bootstrap_source``) in whatever Python the image has (3.8+).
It imports only built-in modules (and ctypes when a run asks for artifacts), so it
costs a few milliseconds before the user's program starts. It reads from stdin, with
exact counts so that nothing past its own input is consumed, a stream of frames
(4-byte big-endian length, then that many bytes):

    the spec (a marshalled dict)
    per archive member: a marshalled (kind, name, mode, linkname, size) header,
        then, for a file, frames carrying exactly ``size`` bytes
    an empty frame (end of the archive)
    then the request's stdin, untouched, until EOF

The runner parses the uploaded tar on the host; here every member passes the
same ``TarChecker`` rules again before anything of it is written. The bootstrap
then reports with one control line on stdout, ``\\0pyexec <status> <message>\\n``,
which the runner strips: ``ready`` (the user's program follows), ``setup_ok``
(a setup-only container is done), ``setup_failed`` (the setup output follows)
or ``error``. After ``ready`` it runs ``python3 <entrypoint> <args>`` in /work,
so the rest of stdin is the user program's stdin: with a ``deadline`` in the spec
as its child, which it kills with everything it started when the deadline passes,
ending with a trailer line on stderr, ``\\0pyexec end <exit|timeout|stopped> <code>\\n``
(the runner strips it; a sandbox killed from outside has none); without one, it
execs the program.
"""

from __future__ import annotations

import marshal
import os
import struct
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

    # Inside the container tarcheck.py's source follows this file's.
    from .collect import write_artifacts
    from .tarcheck import DIR, HARDLINK, SYMLINK, TarChecker

WORK = "/work"
STATE = WORK + "/.pyexec"
SITE = STATE + "/site"
CONTROL = b"\0pyexec "
TRAILER = b"\0pyexec end "
ARTIFACTS_MARK = b"\0pyexec artifacts "
#: What to collect once the program is over (``spec["run"]["artifacts"]``), if anything.
ARTIFACTS: dict[str, Any] = {}


def read_exact(count: int) -> bytes:
    buf = bytearray()
    while len(buf) < count:
        chunk = os.read(0, count - len(buf))
        if not chunk:
            raise EOFError("stdin ended inside a frame")
        buf += chunk
    return bytes(buf)


def read_frame() -> bytes:
    (length,) = struct.unpack(">I", read_exact(4))
    return read_exact(length) if length else b""


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def control(status: str, message: str = "") -> None:
    line = status + " " + " ".join(message.split())
    write_all(1, CONTROL + line.encode("utf-8", "replace") + b"\n")


def replace(target: str) -> None:
    """Make room for a member that repeats an earlier name (the later one wins)."""
    if os.path.lexists(target) and not os.path.isdir(target):
        os.unlink(target)


def extract(limits: dict[str, int]) -> None:
    checker = TarChecker(limits["max_entries"], limits["max_bytes"])
    while True:
        header = read_frame()
        if not header:
            return
        kind, name, mode, linkname, size = marshal.loads(header)  # noqa: S302 - see main()
        path = checker.add(name, kind, size, linkname)
        if path is None:
            continue
        target = WORK + "/" + path
        # The checker guarantees every parent is a real directory inside /work.
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if kind == DIR:
            os.makedirs(target, mode=(mode & 0o755) | 0o700, exist_ok=True)
            continue
        replace(target)
        if kind == SYMLINK:
            os.symlink(linkname, target)
        elif kind == HARDLINK:
            os.link(WORK + "/" + checker.normalize(linkname), target, follow_symlinks=False)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(target, flags, (mode & 0o755) | 0o600)
            try:
                left = size
                while left > 0:
                    chunk = read_frame()
                    if not chunk or len(chunk) > left:
                        raise ValueError(f"member {name!r}: data does not match its size")
                    write_all(fd, chunk)
                    left -= len(chunk)
            finally:
                os.close(fd)


def tail(path: str, limit: int) -> bytes:
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - limit))
        return fh.read()


def setup(spec: dict[str, Any], env: dict[str, str]) -> str | None:
    """Install requirements, run pre_commands; returns an error message or None."""
    import subprocess
    import time

    deadline = time.monotonic() + spec["timeout"]
    env = dict(env, PYTHONPATH=SITE, PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PATH"] = SITE + "/bin:" + env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(spec.get("env") or {})
    steps: list[tuple[str, list[str]]] = []
    if spec.get("requirements", "").strip():
        requirements = STATE + "/requirements.txt"
        with open(requirements, "w", encoding="utf-8") as fh:
            fh.write(spec["requirements"])
        pip = [sys.executable, "-m", "pip", "install", "--no-input", "--progress-bar", "off"]
        steps.append(("pip install", [*pip, "--target", SITE, "-r", requirements]))
    for command in spec.get("commands") or []:
        steps.append((command, ["sh", "-c", command]))
    out_path, err_path = STATE + "/setup.out", STATE + "/setup.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        for label, argv in steps:
            remaining = deadline - time.monotonic()
            proc = subprocess.Popen(
                argv,
                cwd=WORK,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
            try:
                code = proc.wait(max(remaining, 0.001))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                return f"setup timed out after {spec['timeout']}s during {label!r}"
            if code != 0:
                return f"setup step {label!r} exited with {code}"
    os.unlink(out_path)
    os.unlink(err_path)
    return None


def setup_failed(message: str, limit: int) -> NoReturn:
    control("setup_failed", message)
    write_all(1, tail(STATE + "/setup.out", limit))
    write_all(2, tail(STATE + "/setup.err", limit))
    sys.exit(1)


def cap_cpu(seconds: int, pid: int = 0) -> bool:
    """A backstop for when the host stops watching (its process died): CPU time the
    program cannot reach while the host enforces the timeout, even with every core busy.
    Of process ``pid`` (0: this one); whether it is set."""
    try:
        import resource  # an extension module: absent from some images' Pythons
    except ImportError:
        return False
    limit = seconds * (os.cpu_count() or 1)
    try:
        # SIGXCPU at the soft limit, SIGKILL at the hard one.
        resource.prlimit(pid, resource.RLIMIT_CPU, (limit, limit + 10))
    except (ValueError, OSError):
        return False
    return True


def hide_memory() -> None:
    """Make this process undumpable, so that the program (its child, with the same uid)
    cannot read its memory, where the artifacts mark's nonce is, through /proc (it has no
    capability to override that). The program's own exec makes the program dumpable
    again. ctypes is imported only here: a run asking for artifacts pays its ~3 ms."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, SUID_DUMP_DISABLE
    except (ImportError, OSError, AttributeError):
        pass  # a Python without ctypes: the nonce still guards against output by chance


def program_env(env: dict[str, str], spec: dict[str, Any]) -> dict[str, str]:
    """The user program's environment: the container's, the request's variables, the
    packages a setup installed and the cached environment (``spec["deps"]``) on its path."""
    env = dict(env)
    env.update(spec.get("env") or {})
    if os.path.isdir(SITE):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, env.get("PYTHONPATH")) if p)
        env["PATH"] = SITE + "/bin:" + env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    deps = spec.get("deps")  # a cached environment, mounted read-only (pyexec.deps)
    if deps:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (deps, env.get("PYTHONPATH")) if p)
        env["PATH"] = deps + "/bin:" + env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


def watched() -> set[int]:
    """The signals the bootstrap waits for while the program runs (``supervise``): the
    program's exit, and a stop (SIGTERM from the engine, through init)."""
    import signal

    return {signal.SIGCHLD, signal.SIGTERM}


class Preloaded:
    """The program's interpreter, started before the spec arrived with ``modules``
    imported in the environment of a run of cached environment ``deps`` (``preload.py``:
    its source is the bootstrap's last argument). ``take`` hands it the program."""

    def __init__(self, deps: str, modules: list[str], source: str) -> None:
        import signal

        self.env = program_env(dict(os.environ), {"deps": deps})
        # Blocked before the fork, so that the child's exit cannot be missed (supervise).
        signal.pthread_sigmask(signal.SIG_BLOCK, watched())
        control_r, self.control = os.pipe()
        self.status, status_w = os.pipe()
        out, err = os.dup(1), os.dup(2)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, watched())
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1)
                os.dup2(null, 2)
                os.close(null)
                os.close(self.control)
                os.close(self.status)
                for fd in (status_w, control_r, out, err):
                    os.set_inheritable(fd, True)
                os.chdir(WORK)  # where a fresh program imports them (not on its path yet)
                fds = [str(fd) for fd in (status_w, control_r, out, err)]
                argv = [sys.executable, "-c", source, *fds, *modules]
                os.execve(sys.executable, argv, self.env)  # noqa: S606 - the program's interpreter
            finally:
                os._exit(127)
        for fd in (control_r, status_w, out, err):
            os.close(fd)

    def take(self, spec: dict[str, Any], env: dict[str, str]) -> bool:
        """Hand it the program of ``spec`` (to run in ``env``, in the current directory),
        within the spec's deadline; whether it runs it (else it is gone)."""
        import select

        if env == self.env and spec.get("deadline") and spec.get("cpu_backstop"):
            message = marshal.dumps((os.getcwd(), spec["entrypoint"], list(spec.get("args", ()))))
            try:
                # Forked before the bootstrap's own cap: it gets the same one.
                if cap_cpu(spec["cpu_backstop"], self.pid):
                    write_all(self.control, message)
                    self._close()
                    # poll, not select: gVisor refuses select(2).
                    answer = select.poll()
                    answer.register(self.status, select.POLLIN)
                    ready = answer.poll(int(spec["deadline"] * 1000))
                    if ready and os.read(self.status, 1) == b"y":
                        self._close()
                        return True
            except OSError:
                pass
        self.drop()
        return False

    def _close(self) -> None:
        """Close the control descriptor, else the status one (each once)."""
        fd = self.control if self.control >= 0 else self.status
        if self.control >= 0:
            self.control = -1
        else:
            self.status = -1
        if fd >= 0:
            os.close(fd)

    def drop(self) -> None:
        """End it (idempotent), waiting for its exit."""
        self._close()
        self._close()
        if self.pid:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
            self.pid = 0


#: The interpreter started ahead of the spec, when the sandbox was made for one
#: (``main``: its arguments say so).
PRELOADED: list[Preloaded] = []


def run(spec: dict[str, Any], env: dict[str, str]) -> NoReturn:
    ARTIFACTS.update(spec.get("artifacts") or {})
    if ARTIFACTS:
        hide_memory()
    if spec.get("cpu_backstop"):
        cap_cpu(spec["cpu_backstop"])
    env = program_env(env, spec)
    os.chdir(WORK)
    control("ready")
    argv = [sys.executable, spec["entrypoint"], *spec.get("args", ())]
    if PRELOADED:
        preloaded = PRELOADED.pop()
        if preloaded.take(spec, env):
            supervise(argv, env, spec["deadline"], preloaded.pid)
    if not spec.get("deadline"):
        os.execve(sys.executable, argv, env)  # noqa: S606 - running the user program is the point
    supervise(argv, env, spec["deadline"])


def supervise(argv: list[str], env: dict[str, str], deadline: float, pid: int = 0) -> NoReturn:
    """Run the program as a child (or let child ``pid`` run it: ``Preloaded``) and end it,
    with everything it started, once ``deadline`` seconds have passed: the wall-clock limit
    holds even when nobody outside watches any more. The program's stdin, stdout and
    stderr are this process's own, untouched. The last line on stderr says how it ended."""
    import signal
    import time

    end = time.monotonic() + deadline
    # Blocked before the fork, so that neither the child's exit nor a stop (SIGTERM from
    # the engine, through init) can be missed.
    signals = watched()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    if not pid:
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            os.execve(sys.executable, argv, env)  # noqa: S606 - running the user program is the point
    os.close(0)  # the rest of stdin is the program's
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        remaining = end - time.monotonic()
        if remaining <= 0:
            # Every process of the sandbox but init and this one (they all share its uid).
            os.kill(-1, signal.SIGKILL)
            os.waitpid(pid, 0)
            ended("timeout", 128 + signal.SIGKILL)
        got = signal.sigtimedwait(signals, remaining)
        if got is not None and got.si_signo == signal.SIGTERM:
            # The container is being stopped (the engine shutting down, an operator).
            os.kill(-1, signal.SIGKILL)
            os.waitpid(pid, 0)
            ended("stopped", 128 + signal.SIGTERM)
    code = 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    ended("exit", code)


def ended(kind: str, code: int) -> NoReturn:
    """The artifacts, if asked for, then the trailer, ``\\0pyexec end <kind> <code>``, as
    the last line on stderr (the runner strips it), then exit as the program did."""
    if ARTIFACTS:
        send_artifacts()
    write_all(2, TRAILER + (kind + " " + str(code) + "\n").encode())
    os._exit(code)


def send_artifacts() -> None:
    """End every process the program left, then write a mark line and the matched files
    as a tar on stdout (``pyexec.artifacts.ArtifactStream`` reads them); nothing of the
    program can write or swap a file any more while they are read."""
    import signal

    try:  # noqa: SIM105 - contextlib would be one more import in every sandbox
        os.kill(-1, signal.SIGKILL)  # every process of the sandbox but init and this one
    except OSError:
        pass
    wait_alone(2.0)
    write_all(1, ARTIFACTS_MARK + ARTIFACTS["nonce"].encode("ascii") + b"\n")
    try:
        with os.fdopen(1, "wb", closefd=False) as out:
            write_artifacts(
                out, WORK, ARTIFACTS["patterns"], ARTIFACTS["cap"], ARTIFACTS["max_files"]
            )
    except Exception:  # noqa: BLE001, S110 - the host sees a tar cut short: truncated
        pass


def wait_alone(seconds: float) -> None:
    """Wait (at most ``seconds``) until no process but init, this one and zombies is left."""
    import time

    end = time.monotonic() + seconds
    mine = {1, os.getpid()}
    while time.monotonic() < end:
        alive = False
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in mine:
                continue
            try:
                with open("/proc/" + name + "/stat", "rb") as fh:
                    state = fh.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in (b"Z", b"X"):
                alive = True
                break
        if not alive:
            return
        time.sleep(0.01)


def main() -> None:
    if sys.argv[1:2] == ["preload"]:  # <deps> <module,module> <preload.py's source>
        PRELOADED.append(Preloaded(sys.argv[2], sys.argv[3].split(","), sys.argv[4]))
    # Frames come from the runner on the host; marshal is built in (json would cost imports).
    spec = marshal.loads(read_frame())  # noqa: S302
    if PRELOADED and (spec.get("setup") or not spec.get("run")):
        PRELOADED.pop().drop()
    env = dict(os.environ)
    try:
        os.makedirs(STATE + "/tmp", exist_ok=True)
        if spec.get("extract"):
            extract(spec["limits"])
        elif read_frame():
            raise ValueError("unexpected archive for a container that does not unpack")
    except Exception as exc:  # noqa: BLE001 - any failure is reported on the control line
        control("error", f"could not unpack the project: {exc}")
        sys.exit(1)
    if spec.get("setup"):
        failure = setup(spec["setup"], env)
        if failure:
            setup_failed(failure, spec["setup"]["max_output"])
        if not spec.get("run"):
            control("setup_ok")
            # Stay up until the runner closes stdin: it does so once the run container
            # has mounted /work too, since a tmpfs volume no container uses is emptied.
            while os.read(0, 65536):
                pass
            return
    run(spec["run"], env)
