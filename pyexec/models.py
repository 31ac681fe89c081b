"""Values that cross the seams: what a caller asks for and what an execution became.

``ExecutionRequest`` keeps the established metadata schema (``entrypoint``,
``docker_image``, ``requirements_txt``, ``pre_commands``, ``stdin``,
``env_vars``, ``script_args``, ``config{...}``); ``Execution`` is the record
every backend stores and every endpoint returns.
"""

from __future__ import annotations

import enum
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import attrs

from .errors import BackendError, BadRequest, LimitExceeded
from .imageref import is_valid_reference
from .sandbox.collect import MAX_PATTERNS, check_pattern
from .settings import CONFIG_MINIMA, Settings

__all__ = [
    "TERMINAL",
    "Artifact",
    "CallbackState",
    "Execution",
    "ExecutionConfig",
    "ExecutionRequest",
    "IdempotencyKey",
    "Reason",
    "RunOutcome",
    "Status",
    "callback_outstanding",
    "new_execution_id",
    "parse_request",
    "utcnow",
]


class Status(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    KILLED = "killed"


TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.KILLED})

#: Which status may follow which; a terminal status never changes again.
TRANSITIONS: Mapping[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.RUNNING, *TERMINAL}),
    Status.RUNNING: TERMINAL,
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset(),
    Status.KILLED: frozenset(),
}


class Reason(enum.StrEnum):
    """Why a run ended: one verdict per limit, so an OOM never looks like an exit 137."""

    EXITED = "exited"  # the process ended by itself; see exit_code
    TIMEOUT = "timeout"
    OOM = "oom"
    OUTPUT_LIMIT = "output_limit"
    KILLED = "killed"
    SETUP_FAILED = "setup_failed"
    ERROR = "error"  # pyexec or a backend failed; see error

    @property
    def status(self) -> Status:
        if self is Reason.EXITED:
            return Status.COMPLETED
        if self is Reason.KILLED:
            return Status.KILLED
        return Status.FAILED


#: Layout of a stored request (``ExecutionRequest.to_dict``); records without one are 1.
REQUEST_VERSION = 2


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_execution_id() -> str:
    """``exe_`` and a UUIDv7 (RFC 9562): the creation time in milliseconds first, so ids
    sort by creation (in the Consul UI, in listings); the same shape as the random
    UUIDv4 ids of earlier versions, which ``EXECUTION_ID`` still accepts."""
    return f"exe_{_uuid7()}"


_last_uuid7 = (0, 0)  # (unix ms, 12-bit sequence) of the last id this process made
_uuid7_lock = threading.Lock()


def _uuid7() -> uuid.UUID:
    """A UUIDv7 whose 12 ``rand_a`` bits count up within a millisecond (RFC 9562, method
    1), so ids made one after another by this process sort in that order."""
    global _last_uuid7
    with _uuid7_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, seq = _last_uuid7
        if ms > last_ms:
            seq = secrets.randbits(10)  # leaves room to count up within the millisecond
        else:  # same millisecond, or the clock stepped back: keep counting from the last
            ms, seq = last_ms, seq + 1
            if seq > 0xFFF:
                ms, seq = ms + 1, 0
        _last_uuid7 = (ms, seq)
    value = (ms & (2**48 - 1)) << 80 | 0x7 << 76 | seq << 64 | 0b10 << 62 | secrets.randbits(62)
    return uuid.UUID(int=value)


#: An execution id: ``exe_`` and a UUID in its canonical form (v7 now, v4 before).
EXECUTION_ID = re.compile(r"^exe_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _parse_iso(value: str | None) -> datetime | None:
    if value is None:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@attrs.frozen(kw_only=True)
class ExecutionConfig:
    timeout_seconds: int
    memory_mb: int
    disk_mb: int
    cpu_shares: int
    pids_limit: int
    max_output_bytes: int
    network_disabled: bool = True
    #: Most bytes of artifacts (output files) collected in total.
    max_artifact_bytes: int = 16 * 1024 * 1024


@attrs.frozen(kw_only=True)
class ExecutionRequest:
    entrypoint: str
    docker_image: str
    config: ExecutionConfig
    requirements_txt: str = ""
    pre_commands: tuple[str, ...] = ()
    stdin: str = ""
    env_vars: tuple[tuple[str, str], ...] = ()
    script_args: tuple[str, ...] = ()
    #: Where the final record is POSTed, signed, when the execution ends (``pyexec.callbacks``).
    callback_url: str | None = None
    #: Glob patterns of output files to collect after the run (``pyexec.artifacts``).
    artifacts: tuple[str, ...] = ()

    @property
    def needs_setup(self) -> bool:
        return bool(self.requirements_txt.strip() or self.pre_commands)

    def to_dict(self) -> dict[str, Any]:
        """The metadata JSON form, as a client sends it, plus the ``version`` of this
        layout (as stored with the record; ``from_dict`` reads it back)."""
        body: dict[str, Any] = {
            "version": REQUEST_VERSION,
            "entrypoint": self.entrypoint,
            "docker_image": self.docker_image,
            "requirements_txt": self.requirements_txt,
            "pre_commands": list(self.pre_commands),
            "stdin": self.stdin,
            "env_vars": [f"{k}={v}" for k, v in self.env_vars],
            "script_args": list(self.script_args),
            "config": attrs.asdict(self.config),
        }
        if self.callback_url is not None:
            body["callback_url"] = self.callback_url
        if self.artifacts:
            body["artifacts"] = list(self.artifacts)
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionRequest:
        """The request ``to_dict`` stored; also reads records written before requests
        carried a ``version`` (version 1: the same fields, untyped)."""
        version = data.get("version", 1)
        if version not in (1, REQUEST_VERSION):
            raise BackendError(
                f"a stored request has version {version!r}; this pyexec reads up to "
                f"{REQUEST_VERSION} (a newer server wrote it)",
                code="store_error",
            )
        config = data.get("config") or {}
        fields = {f.name for f in attrs.fields(ExecutionConfig)}
        return cls(
            entrypoint=str(data.get("entrypoint") or "main.py"),
            docker_image=str(data.get("docker_image") or ""),
            config=ExecutionConfig(**{k: v for k, v in config.items() if k in fields}),
            requirements_txt=str(data.get("requirements_txt") or ""),
            pre_commands=tuple(data.get("pre_commands") or ()),
            stdin=str(data.get("stdin") or ""),
            env_vars=tuple(
                (key, value)
                for key, _, value in (
                    str(item).partition("=") for item in data.get("env_vars") or ()
                )
            ),
            script_args=tuple(data.get("script_args") or ()),
            callback_url=data.get("callback_url") or None,
            artifacts=tuple(data.get("artifacts") or ()),
        )


@attrs.frozen(kw_only=True)
class Artifact:
    """One output file a run left: its path relative to the working directory, size and
    SHA-256 (hex); ``offset`` is where its bytes start in the stored blob (stored only)."""

    path: str
    size: int
    sha256: str
    offset: int = 0

    def to_dict(self, *, stored: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"path": self.path, "size": self.size, "sha256": self.sha256}
        if stored:
            body["offset"] = self.offset
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Artifact:
        return cls(
            path=str(data["path"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            offset=int(data.get("offset") or 0),
        )


@attrs.frozen(kw_only=True)
class CallbackState:
    """How the delivery of an execution's completion callback goes (``callback`` in a record).

    One replica delivers at a time: the one whose ``owner`` token holds an unexpired
    ``lease_until`` (renewed with every attempt it stores). A replica that dies mid-retry
    leaves a lease that runs out, and another replica takes the delivery over, within
    the same ``retry_until`` bound (``pyexec.callbacks``).
    """

    #: ``pending`` (being tried), ``delivered`` (a 2xx answer), ``failed`` (gave up).
    status: str = "pending"
    attempts: int = 0
    last_error: str | None = None
    #: Attempts stop after this (set when the delivery starts: the bound holds across replicas).
    retry_until: datetime | None = None
    #: Which replica delivers, and until when its claim holds.
    owner: str | None = None
    lease_until: datetime | None = None

    def to_dict(self, *, stored: bool = False) -> dict[str, Any]:
        """The public form (``status``, ``attempts``, ``last_error``); ``stored`` adds the
        bound and the claim, which only replicas read."""
        body: dict[str, Any] = {
            "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }
        if stored:
            body["retry_until"] = _iso(self.retry_until)
            body["owner"] = self.owner
            body["lease_until"] = _iso(self.lease_until)
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallbackState:
        return cls(
            status=str(data.get("status", "pending")),
            attempts=int(data.get("attempts", 0)),
            last_error=data.get("last_error"),
            retry_until=_parse_iso(data.get("retry_until")),
            owner=data.get("owner"),
            lease_until=_parse_iso(data.get("lease_until")),
        )


def callback_outstanding(record: Execution) -> bool:
    """Whether ``record`` ended and its completion callback is neither delivered nor given up."""
    if not record.terminal or record.request is None or record.request.callback_url is None:
        return False
    return record.callback is None or record.callback.status == "pending"


@attrs.frozen(kw_only=True)
class IdempotencyKey:
    """A submit's ``Idempotency-Key``, as stores keep it: unique among live records."""

    #: SHA-256 (hex) of the client's key: fixed length, safe in any store's key space.
    key: str
    #: SHA-256 (hex) of the request (metadata and tar): the same key must mean the same run.
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "fingerprint": self.fingerprint}


@attrs.frozen(kw_only=True)
class RunOutcome:
    """What a runner reports when a run is over."""

    reason: Reason
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    #: Extra fields a wrapper inside the sandbox reported (eval: result, error_type, ...).
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    #: How requirements were served (``pyexec.deps``): ``hit`` (a ready cached
    #: environment), ``miss`` (cached after a build this run waited for), ``off`` (installed
    #: in the run's own setup phase); ``None`` without requirements.
    deps_cache: str | None = None
    #: Output files collected (``pyexec.artifacts``), and whether some were left out.
    artifacts: tuple[Artifact, ...] = ()
    artifacts_truncated: bool = False
    #: The tar holding their bytes (``Artifact.offset``), for the service to store.
    artifact_blob: BinaryIO | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen(kw_only=True)
class Execution:
    """The record of one execution, as stored and as returned by the API."""

    execution_id: str
    status: Status = Status.PENDING
    created_at: datetime = attrs.field(factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None
    exit_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    reason: Reason | None = None
    output_truncated: bool = False
    #: eval API extras; ``None`` where they do not apply.
    result: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    auto_requirements: tuple[str, ...] | None = None
    #: The completion callback's delivery, when the request named a ``callback_url``.
    callback: CallbackState | None = None
    #: The submit's idempotency key (stored, never shown in API answers).
    idempotency: IdempotencyKey | None = None
    #: The request as submitted, kept so any replica or a Nomad task can run it (stored in
    #: its ``to_dict`` form).
    request: ExecutionRequest | None = None
    #: How the run got its requirements (``RunOutcome.deps_cache``); ``None`` without.
    deps_cache: str | None = None
    #: Output files the run left (``pyexec.artifacts``), and whether some were left out.
    artifacts: tuple[Artifact, ...] = ()
    artifacts_truncated: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self, *, include_request: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {
            "execution_id": self.execution_id,
            "status": self.status.value,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "exit_code": self.exit_code,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_ms": self.duration_ms,
            "error": self.error,
            "reason": None if self.reason is None else self.reason.value,
            "output_truncated": self.output_truncated,
            "created_at": _iso(self.created_at),
            "artifacts": [a.to_dict(stored=include_request) for a in self.artifacts],
            "artifacts_truncated": self.artifacts_truncated,
        }
        for name in ("result", "error_type", "error_line"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.auto_requirements is not None:
            body["auto_requirements"] = list(self.auto_requirements)
        if self.deps_cache is not None:
            body["deps_cache"] = self.deps_cache
        if self.callback is not None:
            body["callback"] = self.callback.to_dict(stored=include_request)
        if include_request and self.request is not None:
            body["request"] = self.request.to_dict()
        if include_request and self.idempotency is not None:
            body["idempotency"] = self.idempotency.to_dict()
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Execution:
        auto = data.get("auto_requirements")
        request = data.get("request")
        callback = data.get("callback")
        idempotency = data.get("idempotency")
        return cls(
            execution_id=data["execution_id"],
            status=Status(data["status"]),
            created_at=_parse_iso(data.get("created_at")) or utcnow(),
            started_at=_parse_iso(data.get("started_at")),
            finished_at=_parse_iso(data.get("finished_at")),
            duration_ms=data.get("duration_ms"),
            exit_code=data.get("exit_code"),
            stdout=data.get("stdout") or "",
            stderr=data.get("stderr") or "",
            error=data.get("error"),
            reason=None if data.get("reason") is None else Reason(data["reason"]),
            output_truncated=bool(data.get("output_truncated", False)),
            result=data.get("result"),
            error_type=data.get("error_type"),
            error_line=data.get("error_line"),
            auto_requirements=None if auto is None else tuple(auto),
            callback=None if callback is None else CallbackState.from_dict(callback),
            idempotency=None
            if idempotency is None
            else IdempotencyKey(
                key=str(idempotency["key"]), fingerprint=str(idempotency["fingerprint"])
            ),
            request=None if request is None else ExecutionRequest.from_dict(request),
            deps_cache=data.get("deps_cache"),
            artifacts=tuple(Artifact.from_dict(a) for a in data.get("artifacts") or ()),
            artifacts_truncated=bool(data.get("artifacts_truncated", False)),
        )

    def finished(self, outcome: RunOutcome) -> Execution:
        """This record once ``outcome`` is known (status, output, timings)."""
        started = outcome.started_at or self.started_at
        finished = outcome.finished_at or utcnow()
        duration = (
            None if started is None else max(0, int((finished - started).total_seconds() * 1000))
        )
        known = {"result", "error_type", "error_line", "auto_requirements"}
        extra = {k: v for k, v in outcome.extra.items() if k in known}
        if "auto_requirements" in extra and extra["auto_requirements"] is not None:
            extra["auto_requirements"] = tuple(extra["auto_requirements"])
        return attrs.evolve(
            self,
            status=outcome.reason.status,
            reason=outcome.reason,
            exit_code=outcome.exit_code,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            output_truncated=outcome.output_truncated,
            started_at=started,
            finished_at=finished,
            duration_ms=duration,
            error=outcome.error,
            deps_cache=outcome.deps_cache,
            artifacts=outcome.artifacts,
            artifacts_truncated=outcome.artifacts_truncated,
            **extra,
        )


# --- Parsing the metadata JSON ----------------------------------------------------------

_TOP_LEVEL = {
    "entrypoint",
    "docker_image",
    "requirements_txt",
    "pre_commands",
    "stdin",
    "env_vars",
    "script_args",
    "config",
    "callback_url",
    "artifacts",
}
_CONFIG = {
    "timeout_seconds",
    "network_disabled",
    "memory_mb",
    "disk_mb",
    "cpu_shares",
    "pids_limit",
    "max_output_bytes",
    "max_artifact_bytes",
}


def _reject_unknown(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(
            f"unknown field '{where}{unknown[0]}'; allowed: {', '.join(sorted(allowed))}",
            code="unknown_field",
            field=f"{where}{unknown[0]}",
        )


def _typed(
    data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str = ""
) -> Any:
    value = data[key]
    # bool is an int in Python; a JSON true is not a number of seconds.
    if isinstance(value, bool) and kind is int:
        raise BadRequest(
            f"{where}{key} must be an integer", code="invalid_field", field=where + key
        )
    if not isinstance(value, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRequest(
            f"{where}{key} must be of type {name}", code="invalid_field", field=where + key
        )
    return value


def _str_list(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    items = _typed(data, key, list)
    if not all(isinstance(item, str) for item in items):
        raise BadRequest(f"{key} must be a list of strings", code="invalid_field", field=key)
    return tuple(items)


def _bounded(name: str, value: int, low: int, high: int) -> int:
    if value < low:
        raise BadRequest(
            f"config.{name} must be at least {low}", code="invalid_field", field=f"config.{name}"
        )
    if value > high:
        raise LimitExceeded(
            f"config.{name}={value} exceeds the server maximum of {high}",
            field=f"config.{name}",
            maximum=high,
        )
    return value


def parse_config(raw: Mapping[str, Any], settings: Settings) -> ExecutionConfig:
    if not isinstance(raw, Mapping):
        raise BadRequest("config must be an object", code="invalid_field", field="config")
    _reject_unknown(raw, _CONFIG, "config.")

    def number(key: str, default: int, high: int) -> int:
        if key not in raw or raw[key] is None:
            return default
        return _bounded(key, _typed(raw, key, int, "config."), CONFIG_MINIMA[key], high)

    network_disabled = True
    if raw.get("network_disabled") is not None:
        network_disabled = _typed(raw, "network_disabled", bool, "config.")
    if not network_disabled and not settings.allow_network:
        raise LimitExceeded(
            "this server does not allow network access for runs",
            code="network_not_allowed",
            field="config.network_disabled",
        )
    return ExecutionConfig(
        timeout_seconds=number("timeout_seconds", settings.default_timeout, settings.max_timeout),
        memory_mb=number("memory_mb", settings.default_memory_mb, settings.max_memory_mb),
        disk_mb=number("disk_mb", settings.default_disk_mb, settings.max_disk_mb),
        cpu_shares=number("cpu_shares", settings.default_cpu_shares, settings.max_cpu_shares),
        pids_limit=number("pids_limit", settings.default_pids_limit, settings.max_pids_limit),
        max_output_bytes=number(
            "max_output_bytes", settings.default_max_output_bytes, settings.max_output_bytes
        ),
        network_disabled=network_disabled,
        max_artifact_bytes=number(
            "max_artifact_bytes", settings.default_max_artifact_bytes, settings.max_artifact_bytes
        ),
    )


def check_entrypoint(entrypoint: str) -> str:
    parts = entrypoint.split("/")
    if (
        not entrypoint
        or entrypoint.startswith("/")
        or any(part in {"", ".", ".."} for part in parts)
        or "\x00" in entrypoint
    ):
        raise BadRequest(
            f"entrypoint {entrypoint!r} must be a relative path inside the archive",
            code="invalid_entrypoint",
            field="entrypoint",
        )
    return entrypoint


def parse_env_vars(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not ENV_KEY.match(key):
            raise BadRequest(
                f"env_vars entry {item!r} must look like KEY=value",
                code="invalid_field",
                field="env_vars",
            )
        pairs.append((key, value))
    return tuple(pairs)


def check_image(image: str, settings: Settings) -> str:
    """A valid image reference this server allows: its defaults, PYEXEC_ALLOWED_IMAGES, or
    any image when that list holds ``*``."""
    if not is_valid_reference(image):
        raise BadRequest(
            f"docker_image {image[:300]!r} is not a valid image reference "
            "([registry/]name[:tag][@digest], lower-case name)",
            code="invalid_image",
            field="docker_image",
        )
    allowed = {
        settings.default_image,
        *settings.allowed_images,
        *dict(settings.python_images).values(),
    }
    if image not in allowed and "*" not in settings.allowed_images:
        raise LimitExceeded(
            f"image {image!r} is not allowed on this server (PYEXEC_ALLOWED_IMAGES)",
            code="image_not_allowed",
            field="docker_image",
        )
    return image


def check_callback_url(url: Any, settings: Settings) -> str:
    """A ``callback_url`` this server may call: http(s), to a host the operator allowed
    (``PYEXEC_CALLBACK_ALLOWED_HOSTS``: ``host`` or ``host:port``; none by default)."""
    if not isinstance(url, str):
        raise BadRequest(
            "callback_url must be a string", code="invalid_field", field="callback_url"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BadRequest(
            f"callback_url is not a URL: {exc}", code="invalid_callback_url", field="callback_url"
        ) from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host or parts.username or parts.password:
        raise BadRequest(
            "callback_url must be an http(s) URL with a host and no credentials",
            code="invalid_callback_url",
            field="callback_url",
        )
    port = port or (443 if parts.scheme == "https" else 80)
    allowed = {entry.lower() for entry in settings.callback_allowed_hosts}
    if host not in allowed and f"{host}:{port}" not in allowed:
        raise LimitExceeded(
            f"callbacks to {host}:{port} are not allowed on this server "
            "(PYEXEC_CALLBACK_ALLOWED_HOSTS)",
            code="callback_host_not_allowed",
            field="callback_url",
        )
    if not settings.callback_secret:
        raise LimitExceeded(
            "this server cannot sign callbacks: PYEXEC_CALLBACK_SECRET is not set",
            code="callback_not_configured",
            field="callback_url",
        )
    return url


def check_setup(requirements_txt: str, settings: Settings) -> str:
    """Requirements need the network to install: refused when setup has none, unless
    they are a set the operator has the trusted builder prepare (PYEXEC_DEPS_PREWARM)."""
    if (
        requirements_txt.strip()
        and not settings.setup_network
        and not settings.deps_prewarmed(requirements_txt)
    ):
        raise LimitExceeded(
            "this server gives the setup phase no network (PYEXEC_SETUP_NETWORK), so "
            "requirements_txt cannot be installed (only the sets of PYEXEC_DEPS_PREWARM)",
            code="setup_network_unavailable",
            field="requirements_txt",
        )
    return requirements_txt


def parse_request(raw: Any, settings: Settings) -> ExecutionRequest:
    """Validate the metadata JSON (already decoded) against the schema and the server's limits."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw or "{}")
        except ValueError as exc:
            raise BadRequest(f"metadata is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:  # thousands of nested brackets
            raise BadRequest("metadata is nested too deeply", code="invalid_json") from None
    if not isinstance(raw, Mapping):
        raise BadRequest("metadata must be a JSON object", code="invalid_request")
    _reject_unknown(raw, _TOP_LEVEL, "")
    data = {k: v for k, v in raw.items() if v is not None}

    entrypoint = _typed(data, "entrypoint", str) if "entrypoint" in data else "main.py"
    image = _typed(data, "docker_image", str) if "docker_image" in data else settings.default_image
    return ExecutionRequest(
        entrypoint=check_entrypoint(entrypoint),
        docker_image=check_image(image or settings.default_image, settings),
        config=parse_config(data.get("config") or {}, settings),
        requirements_txt=check_setup(_typed(data, "requirements_txt", str), settings)
        if "requirements_txt" in data
        else "",
        pre_commands=_str_list(data, "pre_commands") if "pre_commands" in data else (),
        stdin=_typed(data, "stdin", str) if "stdin" in data else "",
        env_vars=parse_env_vars(_str_list(data, "env_vars")) if "env_vars" in data else (),
        script_args=_str_list(data, "script_args") if "script_args" in data else (),
        callback_url=check_callback_url(data["callback_url"], settings)
        if "callback_url" in data
        else None,
        artifacts=_artifacts(data["artifacts"]) if "artifacts" in data else (),
    )


def _artifacts(raw: Any) -> tuple[str, ...]:
    """The ``artifacts`` glob patterns, checked (``pyexec.sandbox.collect`` has the rules)."""
    if not isinstance(raw, list):
        raise BadRequest(
            "artifacts must be a list of glob patterns", code="invalid_field", field="artifacts"
        )
    if len(raw) > MAX_PATTERNS:
        raise LimitExceeded(
            f"artifacts has {len(raw)} patterns; at most {MAX_PATTERNS} are allowed",
            code="too_many_artifact_patterns",
            field="artifacts",
            maximum=MAX_PATTERNS,
        )
    for index, pattern in enumerate(raw):
        problem = check_pattern(pattern)
        if problem is not None:
            raise BadRequest(
                f"artifacts[{index}] {str(pattern)[:80]!r} {problem}",
                code="invalid_artifact_pattern",
                field=f"artifacts[{index}]",
            )
    return tuple(dict.fromkeys(raw))
