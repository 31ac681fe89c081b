"""pyexec's runner-job tasks, one script for the three lifecycle steps (stdlib only).

    python3 /local/pyexec_task.py setup    prestart: Consul -> tar -> /alloc, requirements, ...
    python3 /local/pyexec_task.py run      main: the sandboxed entrypoint; verdict -> /alloc
    python3 /local/pyexec_task.py finish   poststop: final record -> Consul (CAS), verdict -> stdout

Nomad ships this file to every task as a plain-text template. It runs in the user's
image, so it sticks to the standard library and to syntax old interpreters accept.
The execution id comes from the dispatch meta (``NOMAD_META_execution_id``); the
request (entrypoint, stdin, env, args, limits) from the execution's record in Consul.
Files the sandboxed code can reach (everything under /alloc) are read back with caps
and type checks: the run may have rewritten them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from typing import IO, Any

#: datetime.UTC is Python 3.11+; the task runs in images with 3.10.
UTC = timezone.utc  # noqa: UP017
ALLOC = os.environ.get("NOMAD_ALLOC_DIR", "/alloc")
#: Nomad makes alloc/data writable for every task user; all three tasks run as uid 1000.
STATE = os.path.join(ALLOC, "data", "pyexec")
SRC = os.path.join(STATE, "src")
SITE = os.path.join(STATE, "site")
TAR = os.path.join(STATE, "bundle.tar")
REQUEST = os.path.join(STATE, "request.json")
SETUP = os.path.join(STATE, "setup.json")
RESULT = os.path.join(STATE, "result.json")
CAPTURE = {"stdout": os.path.join(STATE, "stdout"), "stderr": os.path.join(STATE, "stderr")}
WORK = "/work"
#: The verdict line the finish task prints; the service reads it through the logs API.
VERDICT_PREFIX = "pyexec-verdict "
#: Setup output kept for the record when setup fails.
SETUP_OUTPUT_BYTES = 64 * 1024
#: stdout/stderr above this many bytes is chunked beside the record (see consul_keys.py).
INLINE_OUTPUT_BYTES = 16 * 1024
OUTPUT_CHUNK = 256 * 1024
EXECUTION_ID = re.compile(r"^exe_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
REASONS = ("exited", "timeout", "oom", "output_limit", "killed", "setup_failed", "error")
TERMINAL = ("completed", "failed", "killed")
HTTP_TIMEOUT = 30


class SetupFailed(Exception):
    """The run cannot start: the record says why (reason setup_failed)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def parse_iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def execution_id() -> str:
    value = os.environ.get("NOMAD_META_execution_id", "")  # noqa: SIM112 - Nomad keeps the case
    if not EXECUTION_ID.match(value):
        raise SystemExit(f"pyexec: meta execution_id is missing or malformed: {value!r}")
    return value


# --- Consul KV (layout: pyexec/store/consul_keys.py) ---------------------------------------
class Consul:
    def __init__(self) -> None:
        self.addr = os.environ.get("PYEXEC_CONSUL_ADDR", "http://127.0.0.1:8500").rstrip("/")
        self.prefix = os.environ.get("PYEXEC_CONSUL_PREFIX", "pyexec").strip("/")
        self.token = os.environ.get("CONSUL_HTTP_TOKEN", "")

    def folder(self, eid: str) -> str:
        return f"{self.prefix}/executions/{eid}/"

    def _call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        # The address comes from the job spec (an http(s) URL), not from the sandbox.
        req = urllib.request.Request(self.addr + path, data=body, method=method)  # noqa: S310
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        last: Exception | None = None
        for attempt in range(5):
            try:
                with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT) as resp:  # noqa: S310
                    return resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    return exc.code, exc.read()
                last = exc
            except (urllib.error.URLError, OSError) as exc:
                last = exc
            time.sleep(0.5 * 2**attempt)
        raise RuntimeError(f"Consul at {self.addr} is unreachable: {last}")

    def get(self, key: str) -> tuple[bytes | None, int]:
        """(value, ModifyIndex); (None, 0) when the key does not exist."""
        status, body = self._call("GET", "/v1/kv/" + urllib.parse.quote(key))
        if status == 404:
            return None, 0
        if status != 200:
            raise RuntimeError(f"Consul GET {key} answered {status}: {body[:200]!r}")
        entry = json.loads(body)[0]
        value = base64.b64decode(entry["Value"]) if entry.get("Value") else b""
        return value, int(entry["ModifyIndex"])

    def txn(self, ops: list[dict[str, object]]) -> bool:
        """Run KV operations atomically; False if a check (cas) failed."""
        body = json.dumps([{"KV": op} for op in ops]).encode()
        status, answer = self._call("PUT", "/v1/txn", body)
        if status == 409:
            return False
        if status != 200:
            raise RuntimeError(f"Consul txn answered {status}: {answer[:300]!r}")
        return True


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- small file helpers ---------------------------------------------------------------------
def write_json(path: str, value: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh)
    os.replace(tmp, path)


def read_json(path: str, limit: int = 1024 * 1024) -> dict[str, Any] | None:
    """A JSON object from a file the sandbox could have touched: capped, typed, or None."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except OSError:
        return None
    if len(raw) > limit:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_capped(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


# --- setup (prestart) -----------------------------------------------------------------------
def fetch_tar(consul: Consul, eid: str) -> None:
    raw, _ = consul.get(consul.folder(eid) + "manifest")
    if raw is None:
        raise SetupFailed("the execution's tar is not in Consul (no manifest)")
    manifest = json.loads(raw)
    digest = hashlib.sha256()
    size = 0
    with open(TAR, "wb") as out:
        for index in range(int(manifest["chunks"])):
            chunk, _ = consul.get(f"{consul.folder(eid)}tar/{index:06d}")
            if chunk is None:
                raise SetupFailed(f"tar chunk {index} of {eid} is missing")
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != int(manifest["size"]) or digest.hexdigest() != manifest["sha256"]:
        raise SetupFailed("the tar in Consul does not match its manifest (size or sha256)")


def extract(dest: str) -> None:
    """Extract regular files and directories only, never outside ``dest``."""
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)
    with tarfile.open(TAR, "r:") as tar:
        for member in tar:
            target = os.path.realpath(os.path.join(root, member.name))
            if not (target == root or target.startswith(root + os.sep)):
                raise SetupFailed(f"tar member {member.name!r} points outside the work dir")
            if member.isdir():
                os.makedirs(target, exist_ok=True)
            elif member.isfile():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                with source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
                os.chmod(target, 0o755 if member.mode & 0o111 else 0o644)
            else:
                raise SetupFailed(f"tar member {member.name!r} is not a regular file or directory")


def run_setup_step(argv: list[str], deadline: float, env: dict[str, str], log: list[bytes]) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise SetupFailed("setup timed out")
    try:
        proc = subprocess.run(
            argv,
            cwd=SRC,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=remaining,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        log.append(exc.output or b"")
        raise SetupFailed("setup timed out during: {}".format(" ".join(argv))) from None
    log.append(proc.stdout)
    sys.stdout.buffer.write(proc.stdout)
    sys.stdout.flush()
    if proc.returncode != 0:
        raise SetupFailed(f"setup step failed with exit code {proc.returncode}: {' '.join(argv)}")


def setup() -> int:
    os.makedirs(STATE, exist_ok=True)
    eid = execution_id()
    consul = Consul()
    log: list[bytes] = []
    try:
        raw, _ = consul.get(consul.folder(eid) + "record")
        if raw is None:
            raise SetupFailed(f"execution {eid} has no record in Consul")
        record = json.loads(raw)
        request = record.get("request")
        if not isinstance(request, dict):
            raise SetupFailed(f"the record of {eid} holds no request")
        write_json(REQUEST, request)
        if record.get("status") in TERMINAL:
            raise SetupFailed("execution {} is already {}".format(eid, record["status"]))
        config = request.get("config") or {}
        deadline = time.monotonic() + float(config.get("timeout_seconds") or 300)
        fetch_tar(consul, eid)
        extract(SRC)
        os.unlink(TAR)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONPATH": SITE,
        }
        for name in ("SSL_CERT_FILE", "PIP_CERT", "REQUESTS_CA_BUNDLE"):
            if os.environ.get(name):
                env[name] = os.environ[name]
        requirements = str(request.get("requirements_txt") or "")
        if requirements.strip():
            path = os.path.join(STATE, "requirements.txt")
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(requirements)
            run_setup_step(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--no-cache-dir",
                    "--disable-pip-version-check",
                    "--no-input",
                    "--target",
                    SITE,
                    "-r",
                    path,
                ],
                deadline,
                env,
                log,
            )
        for command in request.get("pre_commands") or []:
            run_setup_step(["/bin/sh", "-c", str(command)], deadline, env, log)
        write_json(SETUP, {"ok": True})
    except SetupFailed as exc:
        output = b"".join(log)[-SETUP_OUTPUT_BYTES:].decode("utf-8", "replace")
        write_json(SETUP, {"ok": False, "error": str(exc), "output": output})
        print(f"pyexec setup failed: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - any crash is a setup failure the record must show
        write_json(SETUP, {"ok": False, "error": f"setup crashed: {exc!r}", "output": ""})
        print(f"pyexec setup crashed: {exc!r}", file=sys.stderr)
    # Always succeed: a failed prestart would keep the main task from recording anything.
    return 0


# --- run (main) -----------------------------------------------------------------------------
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


class Pump(threading.Thread):
    """Copy one stream of the child to ours and to the capture file, up to ``cap`` bytes."""

    def __init__(
        self, source: IO[bytes], sink: IO[bytes], capture: str, cap: int, over: threading.Event
    ) -> None:
        super().__init__(daemon=True)
        self.source, self.sink, self.capture, self.cap, self.over = source, sink, capture, cap, over
        self.count = 0

    def run(self) -> None:
        with open(self.capture, "wb") as keep:
            while True:
                data = os.read(self.source.fileno(), 65536)
                if not data:
                    return
                room = self.cap - self.count
                if len(data) > room:
                    data = data[: max(room, 0)]
                    self.over.set()
                self.count += len(data)
                if data:
                    keep.write(data)
                    keep.flush()
                    self.sink.write(data)
                    self.sink.flush()
                if self.over.is_set():
                    return


def run() -> int:
    setup_state = read_json(SETUP) or {"ok": False, "error": "setup left no state"}
    if not setup_state.get("ok"):
        return 0  # finish reports the setup failure
    request = read_json(REQUEST) or {}
    config = request.get("config") or {}
    assert isinstance(config, dict)
    timeout = float(config.get("timeout_seconds") or 300)
    cap = int(config.get("max_output_bytes") or 1024 * 1024)
    try:
        # Entry by entry: /work itself is a tmpfs root this user may not chmod.
        for name in os.listdir(SRC):
            source = os.path.join(SRC, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(WORK, name))
            else:
                shutil.copy2(source, os.path.join(WORK, name))
    except (OSError, shutil.Error) as exc:
        write_json(
            RESULT,
            {
                "reason": "setup_failed",
                "error": "copying the files into /work failed "
                f"(is the archive larger than the disk limit?): {exc}",
            },
        )
        return 0
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": WORK,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
    }
    if os.path.isdir(SITE):
        env["PYTHONPATH"] = SITE
    for item in request.get("env_vars") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    argv = ["python3", str(request.get("entrypoint") or "main.py")]
    argv += [str(a) for a in request.get("script_args") or []]
    stdin = str(request.get("stdin") or "").encode("utf-8")
    oom_before = oom_kills()
    started = now_iso()
    killed = threading.Event()
    proc = subprocess.Popen(
        argv,
        cwd=WORK,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )

    def kill_group(*_: object) -> None:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)

    def on_term(*_: object) -> None:
        killed.set()
        kill_group()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    over = threading.Event()
    assert proc.stdout is not None
    assert proc.stderr is not None
    pumps = [
        Pump(proc.stdout, sys.stdout.buffer, CAPTURE["stdout"], cap, over),
        Pump(proc.stderr, sys.stderr.buffer, CAPTURE["stderr"], cap, over),
    ]
    for pump in pumps:
        pump.start()

    def feed() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    threading.Thread(target=feed, daemon=True).start()
    deadline = time.monotonic() + timeout
    timed_out = False
    while proc.poll() is None:
        if over.is_set() or killed.is_set():
            kill_group()
        elif time.monotonic() >= deadline:
            timed_out = True
            kill_group()
        over.wait(0.05)
    kill_group()  # whatever the entrypoint left behind in its session
    for pump in pumps:
        pump.join(timeout=5)
    finished = now_iso()
    code = proc.returncode
    exit_code = code if code >= 0 else 128 - code
    if killed.is_set():
        reason = "killed"
    elif timed_out:
        reason = "timeout"
    elif over.is_set():
        reason = "output_limit"
    elif code < 0 and oom_kills() > oom_before:
        reason = "oom"
    else:
        reason = "exited"
    write_json(
        RESULT,
        {
            "reason": reason,
            "exit_code": exit_code,
            "started_at": started,
            "finished_at": finished,
            "output_truncated": over.is_set(),
        },
    )
    return exit_code if 0 <= exit_code < 256 else 1


# --- finish (poststop) ----------------------------------------------------------------------
def verdict(config: dict[str, Any], cap: int) -> dict[str, Any]:
    """The run's outcome from the files in /alloc, checked (the run could have rewritten them)."""
    setup_state = read_json(SETUP)
    if setup_state is None:
        return {"reason": "setup_failed", "error": "setup did not run to completion"}
    if not setup_state.get("ok"):
        return {
            "reason": "setup_failed",
            "error": str(setup_state.get("error") or "setup failed"),
            "stderr": str(setup_state.get("output") or "")[-SETUP_OUTPUT_BYTES:],
        }
    result = read_json(RESULT)
    if result is None:
        return {
            "reason": "error",
            "error": "the run ended without recording a result "
            "(the process was killed or the task failed)",
        }
    reason = result.get("reason")
    if reason not in REASONS:
        return {"reason": "error", "error": "the run recorded an invalid result"}
    out: dict[str, Any] = {"reason": reason}
    if reason == "setup_failed":
        out["error"] = str(result.get("error") or "setup failed")
        return out
    exit_code = result.get("exit_code")
    valid = isinstance(exit_code, int) and not isinstance(exit_code, bool)
    out["exit_code"] = exit_code if valid else None
    out["output_truncated"] = result.get("output_truncated") is True
    for name in ("started_at", "finished_at"):
        try:
            out[name] = parse_iso(str(result.get(name))).isoformat().replace("+00:00", "Z")
        except ValueError:
            out[name] = None
    errors = {
        "timeout": "timed out after {} s".format(config.get("timeout_seconds")),
        "oom": "out of memory (limit: the job's memory)",
        "output_limit": f"output exceeded {cap} bytes",
        "killed": "stopped",
    }
    if reason in errors:
        out["error"] = errors[str(reason)]
    return out


def final_record(
    record: dict[str, Any], found: dict[str, Any], streams: dict[str, bytes], rev: str, folder: str
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The terminal record, and the output chunks to write first (large output sits beside
    the record, as pyexec's Consul store keeps it)."""
    reason = str(found["reason"])
    final = dict(record)
    final.pop("output", None)
    final.update(
        {
            "status": {"exited": "completed", "killed": "killed"}.get(reason, "failed"),
            "reason": reason,
            "exit_code": found.get("exit_code"),
            "error": found.get("error"),
            "output_truncated": bool(found.get("output_truncated")),
        }
    )
    started = found.get("started_at") or record.get("started_at")
    finished = found.get("finished_at") or now_iso()
    final["started_at"], final["finished_at"], final["duration_ms"] = started, finished, None
    if started:
        delta = parse_iso(str(finished)) - parse_iso(str(started))
        final["duration_ms"] = max(0, int(delta.total_seconds() * 1000))
    chunks: list[tuple[str, bytes]] = []
    output: dict[str, Any] = {}
    for name, data in streams.items():
        text = data.decode("utf-8", "replace")
        encoded = text.encode("utf-8")
        final[name] = text
        if len(encoded) <= INLINE_OUTPUT_BYTES:
            continue
        final[name] = ""
        pieces = [encoded[i : i + OUTPUT_CHUNK] for i in range(0, len(encoded), OUTPUT_CHUNK)]
        output[name] = {"chunks": len(pieces), "size": len(encoded)}
        chunks += [
            (f"{folder}output/{rev}/{name}/{i:06d}", piece) for i, piece in enumerate(pieces)
        ]
    if output:
        final["output"] = dict(output, rev=rev)
    return final, chunks


def store_final(consul: Consul, eid: str, found: dict[str, Any], streams: dict[str, bytes]) -> None:
    """Write the terminal record unless the stored one is terminal already (check-and-set)."""
    folder = consul.folder(eid)
    for _ in range(5):
        raw, index = consul.get(folder + "record")
        if raw is None:
            print(f"pyexec: execution {eid} has no record; nothing to write", file=sys.stderr)
            return
        record = json.loads(raw)
        if record.get("status") in TERMINAL:
            print(
                "pyexec: execution {} is already {}".format(eid, record["status"]), file=sys.stderr
            )
            return
        old_rev = (record.get("output") or {}).get("rev")
        rev = f"{time.time_ns():x}"
        final, chunks = final_record(record, found, streams, rev, folder)
        for key, piece in chunks:  # one chunk per transaction: a txn body holds 512 KiB
            consul.txn([{"Verb": "set", "Key": key, "Value": b64(piece)}])
        ops: list[dict[str, Any]] = [
            {
                "Verb": "cas",
                "Key": folder + "record",
                "Index": index,
                "Value": b64(json.dumps(final, ensure_ascii=False, indent=1).encode("utf-8")),
            },
            {"Verb": "set", "Key": folder + "status", "Value": b64(str(final["status"]).encode())},
            # The status at a glance in the Consul UI (docs/consul-layout.md), and the tar,
            # which nothing needs once the run is over.
            {"Verb": "delete", "Key": "{}status={}".format(folder, record.get("status"))},
            {"Verb": "set", "Key": "{}status={}".format(folder, final["status"]), "Value": ""},
            {"Verb": "delete", "Key": folder + "manifest"},
            {"Verb": "delete-tree", "Key": folder + "tar/"},
        ]
        if old_rev:
            ops.append({"Verb": "delete-tree", "Key": f"{folder}output/{old_rev}/"})
        if consul.txn(ops):
            return
        if chunks:
            consul.txn([{"Verb": "delete-tree", "Key": f"{folder}output/{rev}/"}])
    print(f"pyexec: the record of {eid} kept changing; not written", file=sys.stderr)


def finish() -> int:
    eid = execution_id()
    consul = Consul()
    found: dict[str, Any] = {"reason": "error", "error": "finish could not read the record"}
    try:
        raw, _ = consul.get(consul.folder(eid) + "record")
        record = json.loads(raw) if raw else {}
        config = (record.get("request") or {}).get("config") or {}
        cap = int(config.get("max_output_bytes") or 1024 * 1024)
        found = verdict(config, cap)
        streams = {name: read_capped(path, cap) for name, path in CAPTURE.items()}
        if found["reason"] == "setup_failed" and found.get("stderr"):
            streams["stderr"] = str(found["stderr"]).encode("utf-8")
        # A service-dispatched run is stored by the service (it post-processes the
        # outcome); a plain `nomad job dispatch` has only this task to store it.
        if os.environ.get("NOMAD_META_result_writer", "finish") != "service":  # noqa: SIM112
            store_final(consul, eid, {k: v for k, v in found.items() if k != "stderr"}, streams)
    except Exception as exc:  # noqa: BLE001 - still print a verdict for the service to read
        print(f"pyexec finish: {exc!r}", file=sys.stderr)
    sys.stdout.write(VERDICT_PREFIX + json.dumps(found) + "\n")
    sys.stdout.flush()
    return 0


def main(argv: list[str]) -> int:
    steps = {"setup": setup, "run": run, "finish": finish}
    if len(argv) != 2 or argv[1] not in steps:
        print("usage: pyexec_task.py setup|run|finish", file=sys.stderr)
        return 2
    return steps[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
