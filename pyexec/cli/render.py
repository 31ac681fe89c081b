"""What the commands print: script output, notes, ``--json``, ``-v`` metadata, progress.

The script's stdout goes to stdout and its stderr to stderr, byte for byte; pyexec's own
notes go to stderr, and never with ``-q`` or ``--json``. A progress indicator is drawn
only when stderr is a terminal, so piped output stays clean.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from types import TracebackType
from typing import IO, Any

from pyexec.client import Execution, Reason, Status

from .options import Globals

__all__ = ["Progress", "emit_execution", "note", "print_json", "verbose_note", "write"]

_NOTES = {
    Reason.TIMEOUT: "timed out",
    Reason.OOM: "ran out of memory",
    Reason.OUTPUT_LIMIT: "wrote more output than allowed",
    Reason.KILLED: "was killed",
    Reason.SETUP_FAILED: "failed during setup (requirements or pre-commands)",
    Reason.ERROR: "failed inside pyexec",
}


def write(stream: IO[str], text: str) -> None:
    if text:
        stream.write(text)
        stream.flush()


def note(options: Globals, message: str) -> None:
    """A line from pyexec itself on stderr (not with ``-q``/``--json``).

    On a terminal it first clears the line, where a progress spinner may be drawn.
    """
    if options.chatty:
        clear = "\r\x1b[K" if sys.stderr.isatty() else ""
        write(sys.stderr, f"{clear}pyexec: {message}\n")


def verbose_note(options: Globals, message: str) -> None:
    """A note shown with ``-v`` only (never with ``-q``/``--json``)."""
    if options.verbose:
        note(options, message)


def print_json(data: Any) -> None:
    write(sys.stdout, json.dumps(data, indent=2, sort_keys=False) + "\n")


def _metadata(record: Execution) -> list[str]:
    fields: list[tuple[str, Any]] = [
        ("execution_id", record.execution_id),
        ("status", record.status.value),
        ("reason", record.reason.value if record.reason else None),
        ("exit_code", record.exit_code),
        ("duration_ms", record.duration_ms),
        ("output_truncated", record.output_truncated),
        ("error", record.error),
        ("error_type", record.error_type),
        ("error_line", record.error_line),
        ("auto_requirements", ", ".join(record.auto_requirements or ()) or None),
    ]
    return [f"pyexec: {key}: {value}" for key, value in fields if value is not None]


def emit_execution(
    options: Globals, record: Execution, *, skip_stdout: int = 0, skip_stderr: int = 0
) -> None:
    """Print a terminal record: output, then (on stderr) why it ended if not by itself.

    ``skip_*`` leave out output already printed (``follow --tail``).
    """
    if options.json:
        print_json(dict(record.raw))
        return
    write(sys.stdout, record.stdout[skip_stdout:])
    if record.result is not None:
        write(sys.stdout, record.result + "\n")
    if options.quiet:
        return
    write(sys.stderr, record.stderr[skip_stderr:])
    if record.output_truncated and record.reason is not Reason.OUTPUT_LIMIT:
        note(options, "output was truncated")
    if record.status is not Status.COMPLETED:
        what = _NOTES.get(record.reason, record.status.value) if record.reason else "failed"
        detail = f": {record.error}" if record.error else ""
        note(options, f"{record.execution_id} {what}{detail}")
    if options.verbose:
        write(sys.stderr, "\n".join(_metadata(record)) + "\n")


class Progress:
    """A spinner with elapsed time on stderr, drawn only when stderr is a terminal."""

    FRAMES = "|/-\\"

    def __init__(
        self,
        options: Globals,
        label: str,
        stream: IO[str] | None = None,
        interval: float = 0.2,
        *,
        enabled: bool = True,
    ) -> None:
        self._stream = stream or sys.stderr
        self._interval = interval
        self._label = label
        self.enabled = enabled and options.chatty and self._stream.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = time.monotonic()

    def label(self, text: str) -> None:
        self._label = text

    def _draw(self) -> None:
        frame = 0
        while not self._stop.wait(self._interval):
            elapsed = time.monotonic() - self._started
            self._stream.write(f"\r{self.FRAMES[frame % 4]} {self._label} {elapsed:.0f}s\x1b[K")
            self._stream.flush()
            frame += 1

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._draw, name="pyexec-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._stream.write("\r\x1b[K")
            self._stream.flush()
