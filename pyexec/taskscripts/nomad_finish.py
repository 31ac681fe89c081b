"""The ``finish`` task of pyexec's Nomad runner job: store a plain dispatch's final record.

Runs as poststop in the operator's trusted image (``PYEXEC_NOMAD_TRUSTED_IMAGE``), never
in the request's, and runs only trusted code: this file, shipped as a template. Built-in
modules only. A run the pyexec service dispatched (meta ``result_writer=service``) is
stored by the service, which does not wait for this task; it exits at once then.

Everything it must agree on with the service comes from the job spec, which
``pyexec.runner.nomad_job`` builds from the service's own definitions: the keys
(``PYEXEC_RECORD_KEY``, ``PYEXEC_STATUS_KEY``, ``PYEXEC_OUTPUT_FOLDER``, from
``pyexec.store.consul_keys``), the status of each reason (``PYEXEC_STATUS_OF``, from
``pyexec.models.Reason``), the inline-output threshold and chunk size. Its Consul token,
if any, is ``CONSUL_HTTP_TOKEN`` (see docs/nomad.md for the policy it needs).

The files it reads were written next to the user's program: they are read capped and
type-checked. The artifacts the run task left (``artifacts.tar``) pass the service's own
check (``collect.check_artifacts`` with the tar rules of ``tarcheck.py``, both shipped
beside this file) before their blob goes to Consul, chunks first, manifest last, as the
service's store writes it.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    # In the task, tarcheck.py's and collect.py's sources are loaded before main().
    from pyexec.sandbox.collect import check_artifacts
    from pyexec.sandbox.tarcheck import TarChecker, member_kind

ALLOC = os.environ.get("NOMAD_ALLOC_DIR", "/alloc")
OUT = os.path.join(ALLOC, "data", "pyexec")
VERDICT_BYTES = 64 * 1024
TERMINAL = ("completed", "failed", "killed")
HTTP_TIMEOUT = 30
ATTEMPTS = 5
DEFAULT_ARTIFACT_CAP = 16 * 1024 * 1024
#: Most artifact files (``pyexec.artifacts.MAX_ARTIFACT_FILES``).
MAX_ARTIFACT_FILES = 1000


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"pyexec finish: {name} is not set")
    return value


class Consul:
    def __init__(self) -> None:
        self.addr = env("PYEXEC_CONSUL_ADDR").rstrip("/")
        self.token = os.environ.get("CONSUL_HTTP_TOKEN", "")

    def call(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        # The address is the job spec's (an http(s) URL), not the sandbox's.
        request = urllib.request.Request(self.addr + path, data=body, method=method)  # noqa: S310
        if self.token:
            request.add_header("X-Consul-Token", self.token)
        last: Exception | None = None
        for attempt in range(ATTEMPTS):
            try:
                with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as answer:  # noqa: S310
                    return answer.status, answer.read()
            except urllib.error.HTTPError as exc:
                if exc.code < 500:
                    return exc.code, exc.read()
                last = exc
            except OSError as exc:
                last = exc
            time.sleep(0.5 * 2**attempt)
        raise RuntimeError(f"Consul at {self.addr} is unreachable: {last}")

    def get(self, key: str) -> tuple[bytes | None, int]:
        status, body = self.call("GET", "/v1/kv/" + key)
        if status == 404:
            return None, 0
        if status != 200:
            raise RuntimeError(f"Consul GET {key} answered {status}: {body[:200]!r}")
        entry = json.loads(body)[0]
        return base64.b64decode(entry.get("Value") or ""), int(entry["ModifyIndex"])

    def txn(self, ops: list[dict[str, Any]]) -> bool:
        """Apply KV operations atomically; ``False`` when a check-and-set lost."""
        status, body = self.call("PUT", "/v1/txn", json.dumps([{"KV": op} for op in ops]).encode())
        if status == 409:
            return False
        if status != 200:
            raise RuntimeError(f"Consul txn answered {status}: {body[:300]!r}")
        return True


def read_capped(name: str, limit: int) -> bytes:
    try:
        with open(os.path.join(OUT, name), "rb") as fh:
            return fh.read(limit)
    except OSError:
        return b""


def verdict() -> dict[str, Any]:
    """The run task's verdict, checked; an ``error`` verdict if there is none."""
    raw = read_capped("verdict.json", VERDICT_BYTES + 1)
    try:
        found = json.loads(raw) if len(raw) <= VERDICT_BYTES else None
    except ValueError:
        found = None
    if not isinstance(found, dict) or not isinstance(found.get("reason"), str):
        return {"reason": "error", "error": "the run task ended without a verdict"}
    return found


def iso_ms(start: Any, end: Any) -> int | None:
    from datetime import datetime

    try:
        begin = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        over = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0, int((over - begin).total_seconds() * 1000))


def store_artifacts(consul: Consul, request: dict[str, Any]) -> dict[str, Any]:
    """Check the run task's ``artifacts.tar`` as the service does and store the blob under
    the execution's ``artifacts/`` folder; the record's ``artifacts`` fields (with each
    file's offset in the blob, as the service's store keeps them)."""
    import hashlib

    patterns = [str(p) for p in request.get("artifacts") or []]
    config = request.get("config") or {}
    cap = int(config.get("max_artifact_bytes") or DEFAULT_ARTIFACT_CAP)
    try:  # written next to the user's program: never through a link
        fd = os.open(os.path.join(OUT, "artifacts.tar"), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return {"artifacts": [], "artifacts_truncated": True}
    blob_path = os.path.join(os.environ.get("NOMAD_TASK_DIR", "/local"), "artifacts.blob")
    folder = env("PYEXEC_ARTIFACTS_FOLDER")
    chunk = int(env("PYEXEC_OUTPUT_CHUNK_BYTES"))
    with os.fdopen(fd, "rb") as source, open(blob_path, "w+b") as blob:
        checker = TarChecker(MAX_ARTIFACT_FILES + 1, cap)
        kept, cut = check_artifacts(
            source, blob, patterns, cap, MAX_ARTIFACT_FILES, checker, member_kind
        )
        consul.call("DELETE", "/v1/kv/" + folder + "?recurse")
        if kept:
            blob.seek(0)
            digest, size, count = hashlib.sha256(), 0, 0
            while True:
                piece = blob.read(chunk)
                if not piece:
                    break
                digest.update(piece)
                size += len(piece)
                put(consul, f"{folder}{count:06d}", piece)
                count += 1
            manifest = {"chunks": count, "size": size, "sha256": digest.hexdigest()}
            manifest["chunk_size"] = chunk
            put(consul, folder + "manifest", json.dumps(manifest, sort_keys=True).encode())
    os.unlink(blob_path)
    listed = [{"path": p, "size": n, "sha256": h, "offset": o} for p, n, h, o in kept]
    return {"artifacts": listed, "artifacts_truncated": cut}


def put(consul: Consul, key: str, value: bytes) -> None:
    """A create-only raw PUT (as the service's store writes chunks)."""
    status, body = consul.call("PUT", "/v1/kv/" + key + "?cas=0", value)
    if status != 200 or body.strip() != b"true":
        raise RuntimeError(f"Consul PUT {key} answered {status}: {body[:200]!r}")


def final_record(
    record: dict[str, Any],
    found: dict[str, Any],
    streams: dict[str, bytes],
    rev: str,
    artifacts: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """The terminal record and the output chunks to write before it (output above the
    inline threshold sits beside the record, as the service's Consul store keeps it)."""
    status_of: dict[str, str] = json.loads(env("PYEXEC_STATUS_OF"))
    inline = int(env("PYEXEC_INLINE_OUTPUT_BYTES"))
    chunk = int(env("PYEXEC_OUTPUT_CHUNK_BYTES"))
    reason = str(found["reason"]) if found["reason"] in status_of else "error"
    exit_code = found.get("exit_code")
    final = dict(record)
    final.pop("output", None)
    final.update(
        status=status_of[reason],
        reason=reason,
        exit_code=exit_code if type(exit_code) is int else None,
        error=str(found["error"]) if found.get("error") else None,
        output_truncated=found.get("output_truncated") is True,
        started_at=found.get("started_at") or record.get("started_at"),
        finished_at=found.get("finished_at"),
    )
    final["duration_ms"] = iso_ms(final["started_at"], final["finished_at"])
    if (record.get("request") or {}).get("artifacts"):
        # What ``store_artifacts`` stored; none (left out) if it could not.
        final.update(artifacts or {"artifacts": [], "artifacts_truncated": True})
    chunks: list[tuple[str, bytes]] = []
    output: dict[str, Any] = {}
    folder = env("PYEXEC_OUTPUT_FOLDER") + rev + "/"
    for name, data in streams.items():
        text = data.decode("utf-8", "replace")
        encoded = text.encode("utf-8")
        final[name] = text
        if len(encoded) <= inline:
            continue
        final[name] = ""
        pieces = [encoded[i : i + chunk] for i in range(0, len(encoded), chunk)]
        output[name] = {"chunks": len(pieces), "size": len(encoded)}
        chunks += [(f"{folder}{name}/{i:06d}", piece) for i, piece in enumerate(pieces)]
    if output:
        final["output"] = dict(output, rev=rev)
    return final, chunks


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def store(consul: Consul) -> str:
    """Write the terminal record unless the stored one is terminal already."""
    record_key, status_key = env("PYEXEC_RECORD_KEY"), env("PYEXEC_STATUS_KEY")
    found = verdict()
    artifacts: dict[str, Any] | None = None
    for _ in range(ATTEMPTS):
        raw, index = consul.get(record_key)
        if raw is None:
            return "the execution has no record; nothing to write"
        record = json.loads(raw)
        if record.get("status") in TERMINAL or found["reason"] == "skipped":
            return f"the execution is already {record.get('status')}"
        cap = int(
            ((record.get("request") or {}).get("config") or {}).get("max_output_bytes") or 1 << 20
        )
        streams = {name: read_capped(name, max(cap, 0)) for name in ("stdout", "stderr")}
        old_rev = (record.get("output") or {}).get("rev")
        rev = f"{time.time_ns():x}"
        request = record.get("request") or {}
        if artifacts is None and request.get("artifacts"):
            artifacts = store_artifacts(consul, request)
        final, chunks = final_record(record, found, streams, rev, artifacts)
        for key, piece in chunks:  # one chunk per transaction: a txn body holds 512 KiB
            consul.txn([{"Verb": "set", "Key": key, "Value": b64(piece)}])
        body = json.dumps(final, ensure_ascii=False, indent=1).encode("utf-8")
        marker = env("PYEXEC_STATUS_MARKER_KEY")
        ops: list[dict[str, Any]] = [
            {"Verb": "cas", "Key": record_key, "Index": index, "Value": b64(body)},
            {"Verb": "set", "Key": status_key, "Value": b64(str(final["status"]).encode())},
            # The status at a glance (an empty key whose name carries it), and the tar,
            # which nothing needs once the run is over: as the service's store does.
            {"Verb": "delete", "Key": f"{marker}{record.get('status')}"},
            {"Verb": "set", "Key": f"{marker}{final['status']}", "Value": ""},
            {"Verb": "delete", "Key": env("PYEXEC_MANIFEST_KEY")},
            {"Verb": "delete-tree", "Key": env("PYEXEC_TAR_FOLDER")},
        ]
        if old_rev:
            ops.append({"Verb": "delete-tree", "Key": env("PYEXEC_OUTPUT_FOLDER") + old_rev + "/"})
        if consul.txn(ops):
            return f"stored: {final['status']} ({final['reason']})"
        if chunks:
            consul.txn([{"Verb": "delete-tree", "Key": env("PYEXEC_OUTPUT_FOLDER") + rev + "/"}])
    return "the record kept changing; not written"


def main() -> None:
    if os.environ.get("NOMAD_META_result_writer", "finish") == "service":  # noqa: SIM112
        return
    print("pyexec finish:", store(Consul()))


if __name__ == "__main__":
    try:
        # The tar rules and the artifacts check are the service's own modules, shipped
        # beside this file as they are.
        for module in ("tarcheck.py", "collect.py"):
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), module)) as fh:
                exec(compile(fh.read(), module, "exec"))  # noqa: S102 - our own module
        main()
    except Exception as exc:  # noqa: BLE001 - say why in the task's log, fail the task
        print(f"pyexec finish: {exc!r}", file=sys.stderr)
        sys.exit(1)
