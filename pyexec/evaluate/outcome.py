"""Turning the runner's outcome of an eval run into eval's answer.

The wrapper (``sandbox.py``) ends stderr with one report line,
``\\n\\x1epyexec-eval:<tag> {...}\\n``, where ``<tag>`` is random per run. The
report is taken out of stderr, so the user sees only their own output, and its
fields become ``RunOutcome.extra``. When a program that exited with a non-zero
code left no report (it ended through ``os._exit`` or closed fd 2), the error
fields are read from the traceback text instead, if there is one. A run ended
by a limit (timeout, memory, output) gets no error fields.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

import attrs

from pyexec.models import Reason, RunOutcome

from .sandbox import REPORT_MARK

__all__ = ["make_postprocess", "parse_traceback", "split_report"]

#: A report line is small; anything longer than this after the mark is not one.
MAX_REPORT_CHARS = 4 * 1024 * 1024

_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+)', re.MULTILINE)
_EXCEPTION = re.compile(r"^(?P<type>[A-Za-z_][\w.]*)(?::|$)")


def split_report(stderr: str, tag: str) -> tuple[str, dict[str, Any] | None]:
    """``stderr`` without the report line, and the report (``None`` if absent or garbled)."""
    mark = f"\n{REPORT_MARK}{tag} "
    start = stderr.rfind(mark)
    if start < 0:
        return stderr, None
    end = stderr.find("\n", start + len(mark))
    if end < 0:
        return stderr, None
    try:
        report = ast.literal_eval(stderr[start + len(mark) : end])
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return stderr, None
    if not isinstance(report, dict):
        return stderr, None
    return stderr[:start] + stderr[end + 1 :], _checked(report)


def _checked(report: dict[Any, Any]) -> dict[str, Any]:
    result, error_type, error_line = (
        report.get("result"),
        report.get("error_type"),
        report.get("error_line"),
    )
    return {
        "result": result if isinstance(result, str) else None,
        "error_type": error_type if isinstance(error_type, str) else None,
        "error_line": error_line
        if isinstance(error_line, int) and not isinstance(error_line, bool)
        else None,
    }


def parse_traceback(stderr: str, entrypoint: str) -> tuple[str | None, int | None]:
    """``(error_type, error_line)`` from the last traceback Python printed in ``stderr``.

    ``error_line`` is the innermost frame in a file whose path ends with
    ``entrypoint``; a syntax error's own ``File ..., line N`` header counts as one.
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
    error_line = None
    for frame in _FRAME.finditer(text):
        path = frame["file"]
        if path == entrypoint or path.endswith("/" + entrypoint):
            error_line = int(frame["line"])
    return error_type, error_line


def make_postprocess(
    tag: str, entrypoint: str, *, eval_last_expr: bool
) -> Callable[[RunOutcome], RunOutcome]:
    """The ``postprocess`` for ``ExecutionService.run`` of one eval run."""

    def postprocess(outcome: RunOutcome) -> RunOutcome:
        stderr, report = split_report(outcome.stderr, tag)
        if report is None:
            report = {"result": None, "error_type": None, "error_line": None}
            if outcome.reason is Reason.EXITED and outcome.exit_code:
                report["error_type"], report["error_line"] = parse_traceback(stderr, entrypoint)
        if not eval_last_expr:
            report["result"] = None
        extra = {**outcome.extra, **report}
        return attrs.evolve(outcome, stderr=stderr, extra=extra)

    return postprocess
