"""Turning the outcome of an eval run into eval's answer.

The wrapper (``wrapper.py``) ends stderr with one report line,
``\\n\\x1epyexec-eval-report {...}\\n``. The report is taken out of stderr, so
the user sees only their own output, and its fields (``result``,
``error_type``, ``error_line``) become ``RunOutcome.extra``. When a program that
exited with a non-zero code left no report (it ended through ``os._exit`` or
closed fd 2), the error fields are read from the traceback text instead, if
there is one. A run ended by a limit (timeout, memory, output) gets no error
fields.

Everything here is a pure function of the outcome or of the stored record, so
it can be applied wherever a final outcome is stored: ``finish_outcome`` as the
``postprocess`` of ``ExecutionService.run``, ``finish_record`` on a record some
other writer finished (a Nomad task) or that a restarted service adopted.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import attrs

from pyexec.models import Execution, ExecutionRequest, Reason, RunOutcome
from pyexec.runner import OnOutput

from .archive import WRAPPER_PATH
from .wrapper import REPORT_MARK

__all__ = [
    "finish_outcome",
    "finish_record",
    "hide_report",
    "is_eval_request",
    "parse_traceback",
    "split_report",
]

_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+)', re.MULTILINE)
_EXCEPTION = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::|$)")
_FIELDS = ("result", "error_type", "error_line")


def is_eval_request(request: ExecutionRequest | None) -> bool:
    """Whether a stored request is an eval run."""
    return request is not None and request.entrypoint == WRAPPER_PATH


def split_report(stderr: str) -> tuple[str, dict[str, Any] | None]:
    """``stderr`` without the last report line, and that report (``None`` if absent or garbled)."""
    mark = f"\n{REPORT_MARK}"
    start = stderr.rfind(mark)
    if start < 0:
        return stderr, None
    end = stderr.find("\n", start + len(mark))
    if end < 0:
        return stderr, None
    try:
        report = ast.literal_eval(stderr[start + len(mark) : end])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return stderr, None
    if not isinstance(report, dict):
        return stderr, None
    return stderr[:start] + stderr[end + 1 :], _checked(report)


def _checked(report: dict[Any, Any]) -> dict[str, Any]:
    result, error_type, line = (report.get(name) for name in _FIELDS)
    return {
        "result": result if isinstance(result, str) else None,
        "error_type": error_type if isinstance(error_type, str) else None,
        "error_line": line if isinstance(line, int) and not isinstance(line, bool) else None,
    }


def parse_traceback(stderr: str) -> tuple[str | None, int | None]:
    """``(error_type, error_line)`` from the last traceback Python printed in ``stderr``.

    The line is the innermost one in the file of the traceback's first frame (the
    user's entrypoint, as the wrapper prints it); a syntax error's own
    ``File ..., line N`` header counts as a frame.
    """
    start = max(stderr.rfind("Traceback (most recent call last):"), 0)
    text = stderr[start:]
    error_type = None
    for line in reversed(text.rstrip("\n").splitlines()):
        if line and not line[0].isspace():
            if match := _EXCEPTION.match(line):
                error_type = match["type"].rpartition(".")[2]
            break
    if error_type is None:
        return None, None
    frames = [(frame["file"], int(frame["line"])) for frame in _FRAME.finditer(text)]
    if not frames:
        return error_type, None
    first_file = frames[0][0]
    return error_type, [line for path, line in frames if path == first_file][-1]


def _fallback(reason: Reason | None, exit_code: int | None, stderr: str) -> dict[str, Any]:
    error_type, error_line = None, None
    if reason is Reason.EXITED and exit_code:
        error_type, error_line = parse_traceback(stderr)
    return {"result": None, "error_type": error_type, "error_line": error_line}


def finish_outcome(outcome: RunOutcome) -> RunOutcome:
    """The ``postprocess`` of an eval run: report out of stderr, its fields into ``extra``."""
    stderr, report = split_report(outcome.stderr)
    if report is None:
        report = _fallback(outcome.reason, outcome.exit_code, stderr)
    return attrs.evolve(outcome, stderr=stderr, extra={**outcome.extra, **report})


def finish_record(record: Execution) -> Execution:
    """``finish_outcome`` for a terminal eval record finished without it; idempotent.

    Fields already set are kept unless the record still carries a report.
    """
    if not (record.terminal and is_eval_request(record.request)):
        return record
    stderr, report = split_report(record.stderr)
    if report is None:
        if record.error_type is not None:
            return record
        report = _fallback(record.reason, record.exit_code, stderr)
        report["result"] = record.result
    return attrs.evolve(record, stderr=stderr, **report)


def hide_report(forward: OnOutput) -> OnOutput:
    """Live output of an eval run as the user will see it in the record: stderr stops
    before the report mark (``split_report`` takes the report out of the final stderr;
    whatever follows a mark reaches live subscribers from the record). A piece that may
    be the start of the mark is held back until the next one tells."""
    mark = f"\n{REPORT_MARK}".encode()
    pending = b""
    hidden = False

    def on_output(stream: str, data: bytes) -> None:
        nonlocal pending, hidden
        if stream != "stderr":
            forward(stream, data)
            return
        if hidden:
            return
        data, pending = pending + data, b""
        found = data.find(mark)
        if found >= 0:
            hidden = True
            data = data[:found]
        else:
            keep = next((k for k in range(len(mark) - 1, 0, -1) if data.endswith(mark[:k])), 0)
            data, pending = data[: len(data) - keep], data[len(data) - keep :]
        if data:
            forward(stream, data)

    return on_output
