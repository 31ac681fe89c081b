"""The first process in a sandbox container: unpack the project, set it up, run it.

Runs as ``python3 -I -S -c <tarcheck.py + this file>`` (see ``pyexec.sandbox.bootstrap_source``)
in whatever Python the image has (3.8+), standard library only. It reads from
stdin, with exact counts so that nothing past its own input is consumed:

    4-byte big-endian length + JSON spec
    (4-byte length + tar bytes)* then a zero length
    the request's stdin, untouched, until EOF

then reports on stdout with one control line, ``\\0pyexec {json}\\n``, which the
runner strips: ``ready`` (the user's program follows), ``setup_ok`` (a setup-only
container is done), ``setup_failed`` (the setup output follows) or ``error``.
After ``ready`` it execs ``python3 <entrypoint> <args>`` in /work, so the rest of
stdin is the user program's stdin.
"""

import contextlib
import json
import os
import struct
import sys
import tarfile
from typing import Any, NoReturn

# Inside the container tarcheck.py's source runs just before this file instead.
with contextlib.suppress(ImportError):
    from .tarcheck import TarChecker, extract_checked

WORK = "/work"
STATE = WORK + "/.pyexec"
SITE = STATE + "/site"
CONTROL = b"\0pyexec "


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


class FrameReader:
    """The tar frames as a file object for tarfile's stream mode."""

    def __init__(self) -> None:
        self.pending = b""
        self.done = False

    def read(self, size: int | None = -1) -> bytes:
        while not self.pending and not self.done:
            self.pending = read_frame()
            self.done = not self.pending
        if size is None or size < 0:
            size = len(self.pending)
        out, self.pending = self.pending[:size], self.pending[size:]
        return out

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def control(status: str, **fields: Any) -> None:
    fields["status"] = status
    write_all(1, CONTROL + json.dumps(fields).encode() + b"\n")


def extract(reader: FrameReader, limits: dict[str, int]) -> None:
    checker = TarChecker(limits["max_entries"], limits["max_bytes"])
    # Stream mode only ever calls read(); typeshed asks for a full file object.
    with tarfile.open(fileobj=reader, mode="r|") as archive:  # type: ignore[call-overload]
        extract_checked(archive, WORK, checker)


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
    control("setup_failed", error=message)
    write_all(1, tail(STATE + "/setup.out", limit))
    write_all(2, tail(STATE + "/setup.err", limit))
    sys.exit(1)


def run(spec: dict[str, Any], env: dict[str, str]) -> NoReturn:
    env.update(spec.get("env") or {})
    if os.path.isdir(SITE):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SITE, env.get("PYTHONPATH")) if p)
        env["PATH"] = SITE + "/bin:" + env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    os.chdir(WORK)
    control("ready")
    argv = [sys.executable, spec["entrypoint"], *spec.get("args", ())]
    os.execve(sys.executable, argv, env)  # noqa: S606 - running the user program is the point


def main() -> None:
    spec = json.loads(read_frame())
    env = dict(os.environ)
    try:
        os.makedirs(STATE + "/tmp", exist_ok=True)
        reader = FrameReader()
        if spec.get("extract"):
            extract(reader, spec["limits"])
        reader.drain()
    except Exception as exc:  # noqa: BLE001 - any failure is reported on the control line
        control("error", error=f"could not unpack the project: {exc}")
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


if __name__ == "__main__":
    main()
