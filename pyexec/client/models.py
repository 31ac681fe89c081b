"""Typed values the client sends and receives.

``Execution`` mirrors the server's record; ``raw`` keeps the record exactly as
the server sent it (``pyexec --json`` prints it, and fields a newer server adds
are not lost).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import attrs

from pyexec.models import TERMINAL, Reason, Status

__all__ = [
    "Artifact",
    "Execution",
    "Logs",
    "Reason",
    "RunOptions",
    "ServerVersion",
    "Status",
    "Submitted",
]


def _when(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@attrs.frozen(kw_only=True)
class Artifact:
    """One output file of a run: its path relative to the working directory, size and
    SHA-256; ``content`` holds its bytes when eval returned them inline."""

    path: str
    size: int
    sha256: str
    content: bytes | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Artifact:
        inline = data.get("content_base64")
        return cls(
            path=str(data["path"]),
            size=int(data["size"]),
            sha256=str(data["sha256"]),
            content=None if inline is None else base64.b64decode(inline, validate=True),
        )


@attrs.frozen(kw_only=True)
class Execution:
    """One execution as the server reports it."""

    execution_id: str
    status: Status
    stdout: str = ""
    stderr: str = ""
    exit_code: int | None = None
    reason: Reason | None = None
    error: str | None = None
    output_truncated: bool = False
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None
    #: Eval extras; ``None`` where they do not apply.
    result: str | None = None
    error_type: str | None = None
    error_line: int | None = None
    auto_requirements: tuple[str, ...] | None = None
    #: ``hit``/``miss``: requirements came from the dependency cache; ``off``: installed
    #: by the run; ``None`` without requirements.
    deps_cache: str | None = None
    #: Output files the run left (``RunOptions.artifacts``), and whether some were left out.
    artifacts: tuple[Artifact, ...] = ()
    artifacts_truncated: bool = False
    raw: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def ok(self) -> bool:
        """The script ran to its end and exited 0."""
        return self.status is Status.COMPLETED and self.exit_code == 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Execution:
        reason = data.get("reason")
        auto = data.get("auto_requirements")
        return cls(
            execution_id=data["execution_id"],
            status=Status(data["status"]),
            stdout=data.get("stdout") or "",
            stderr=data.get("stderr") or "",
            exit_code=data.get("exit_code"),
            reason=None if reason is None else Reason(reason),
            error=data.get("error"),
            output_truncated=bool(data.get("output_truncated", False)),
            created_at=_when(data.get("created_at")),
            started_at=_when(data.get("started_at")),
            finished_at=_when(data.get("finished_at")),
            duration_ms=data.get("duration_ms"),
            result=data.get("result"),
            error_type=data.get("error_type"),
            error_line=data.get("error_line"),
            auto_requirements=None if auto is None else tuple(auto),
            deps_cache=data.get("deps_cache"),
            artifacts=tuple(Artifact.from_json(a) for a in data.get("artifacts") or ()),
            artifacts_truncated=bool(data.get("artifacts_truncated", False)),
            raw=dict(data),
        )


@attrs.frozen(kw_only=True)
class Submitted:
    """The answer to an asynchronous submit."""

    execution_id: str
    status: Status
    location: str | None = None


@attrs.frozen(kw_only=True)
class Logs:
    """Output so far (the final output once the execution is terminal)."""

    execution_id: str
    status: Status
    stdout: str = ""
    stderr: str = ""
    output_truncated: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


@attrs.frozen(kw_only=True)
class ServerVersion:
    version: str
    backend: str


EnvInput = Mapping[str, str] | Iterable[str] | Iterable[tuple[str, str]]


def _env_pairs(value: EnvInput | None) -> tuple[tuple[str, str], ...]:
    """``{"K": "v"}``, ``["K=v"]`` or ``[("K", "v")]`` as ordered pairs."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple((str(k), str(v)) for k, v in value.items())
    pairs = []
    for item in value:
        if isinstance(item, str):
            key, sep, val = item.partition("=")
            if not sep:
                raise ValueError(f"environment entry {item!r} must look like KEY=value")
            pairs.append((key, val))
        else:
            key, val = item
            pairs.append((str(key), str(val)))
    return tuple(pairs)


def _str_tuple(value: Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen(kw_only=True)
class RunOptions:
    """How to run an archive; ``None`` leaves a setting to the server's default."""

    entrypoint: str | None = None
    image: str | None = None
    requirements: str | None = None
    pre_commands: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    stdin: str | None = None
    env: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_env_pairs)
    args: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    timeout: int | None = None
    memory_mb: int | None = None
    disk_mb: int | None = None
    cpu_shares: int | None = None
    pids_limit: int | None = None
    max_output_bytes: int | None = None
    network: bool | None = None
    #: Glob patterns of output files to collect (``download_artifacts`` fetches them).
    artifacts: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    max_artifact_bytes: int | None = None

    def config(self) -> dict[str, Any]:
        """The ``config`` object of the metadata, with only what is set."""
        config: dict[str, Any] = {
            "timeout_seconds": self.timeout,
            "memory_mb": self.memory_mb,
            "disk_mb": self.disk_mb,
            "cpu_shares": self.cpu_shares,
            "pids_limit": self.pids_limit,
            "max_output_bytes": self.max_output_bytes,
            "network_disabled": None if self.network is None else not self.network,
            "max_artifact_bytes": self.max_artifact_bytes,
        }
        return {k: v for k, v in config.items() if v is not None}

    def metadata(self) -> dict[str, Any]:
        """The ``metadata`` part of ``/exec/sync`` and ``/exec/async``."""
        body: dict[str, Any] = {
            "entrypoint": self.entrypoint,
            "docker_image": self.image,
            "requirements_txt": self.requirements,
            "stdin": self.stdin,
        }
        if self.pre_commands:
            body["pre_commands"] = list(self.pre_commands)
        if self.env:
            body["env_vars"] = [f"{k}={v}" for k, v in self.env]
        if self.args:
            body["script_args"] = list(self.args)
        if self.artifacts:
            body["artifacts"] = list(self.artifacts)
        if config := self.config():
            body["config"] = config
        return {k: v for k, v in body.items() if v is not None}
