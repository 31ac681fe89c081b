"""Structured logs: one JSON object per line, tagged with request and execution ids.

``configure_logging(settings)`` installs one handler on the root logger (and
routes uvicorn's loggers through it). Two context variables carry the ids:
``RequestIdMiddleware`` sets the request id for everything one HTTP request
does, and ``bind_execution(execution_id)`` sets the execution id for a block.
Because asyncio copies the context into tasks it creates, a background task
started inside such a block keeps both ids on every line it logs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

from .models import Execution
from .settings import Settings

__all__ = [
    "ACCEPTABLE_ID",
    "REQUEST_ID_HEADER",
    "JsonFormatter",
    "access_logger",
    "bind_execution",
    "configure_logging",
    "current_execution_id",
    "current_request_id",
    "log_finished",
    "log_started",
    "request_id_var",
]

REQUEST_ID_HEADER = "X-Request-ID"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pyexec_request_id", default=None
)
_execution_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pyexec_execution_id", default=None
)

#: A caller's request id is echoed only if it is short and plain (no header or log injection).
ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

#: Attributes every LogRecord has; anything else came from ``extra=`` and is logged as a field.
#: (uvicorn adds ``color_message``, the message with terminal colour codes: not for JSON.)
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}

access_logger = logging.getLogger("pyexec.http")
_executions = logging.getLogger("pyexec.execution")


def current_request_id() -> str | None:
    return request_id_var.get()


def current_execution_id() -> str | None:
    return _execution_id.get()


@contextlib.contextmanager
def bind_execution(execution_id: str) -> Iterator[None]:
    """Tag every log line inside the block (and tasks started in it) with ``execution_id``."""
    token = _execution_id.set(execution_id)
    try:
        yield
    finally:
        _execution_id.reset(token)


def log_started(record: Execution) -> None:
    """One line when an execution's process starts (a service hook)."""
    _executions.info(
        "execution %s running",
        record.execution_id,
        extra={"execution_id": record.execution_id, "status": record.status.value},
    )


def log_finished(record: Execution) -> None:
    """One line when this replica records an execution's final status (a service hook)."""
    reason = None if record.reason is None else record.reason.value
    _executions.info(
        "execution %s %s (%s)",
        record.execution_id,
        record.status.value,
        reason,
        extra={
            "execution_id": record.execution_id,
            "status": record.status.value,
            "reason": reason,
            "exit_code": record.exit_code,
            "duration_ms": record.duration_ms,
            "error": record.error,
        },
    )


class _ContextFilter(logging.Filter):
    """Copies the current ids onto each record, unless the call passed its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "execution_id", None) is None:
            record.execution_id = _execution_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, ids, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{key}={value}"
            for key in ("request_id", "execution_id")
            if (value := getattr(record, key, None))
        ]
        return f"{text} [{' '.join(ids)}]" if ids else text


def configure_logging(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to ``stream`` (stderr) as ``settings.log_format``; idempotent."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name("pyexec")
    handler.addFilter(_ContextFilter())
    if settings.log_format == "text":
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "pyexec"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn installs its own handlers unless told otherwise; route its lines through ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
    return handler
