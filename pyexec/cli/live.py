"""Printing an execution live, from its event stream (``pyexec run`` and ``pyexec follow``).

Output goes out as it arrives (stdout to stdout, stderr to stderr); ``--json`` prints
one event per line instead. The client reconnects a dropped stream by itself; if it
gives up, the stream is reopened here from the last event seen until the deadline.
"""

from __future__ import annotations

import json
import sys
import time

from pyexec.client import (
    APIError,
    Client,
    ClientError,
    EndEvent,
    Execution,
    OutputEvent,
    StatusEvent,
    StreamEvent,
    WaitTimeout,
)

from .options import Globals
from .render import emit_execution, note, write

__all__ = ["LivePrinter"]

#: Pause before reopening a stream the client gave up on.
REOPEN_SECONDS = 1.0


def event_json(event: StreamEvent) -> dict[str, object]:
    """One event as ``--json`` prints it (one line each)."""
    if isinstance(event, OutputEvent):
        return {"event": event.stream, "id": event.id, "offset": event.offset, "text": event.text}
    kind = "end" if isinstance(event, EndEvent) else "status"
    return {"event": kind, "execution": dict(event.execution.raw)}


class LivePrinter:
    """Follows one execution's events to its end, printing as they come."""

    def __init__(self, options: Globals, *, notes: bool = False) -> None:
        self.options = options
        #: Note each status change on stderr (``follow``).
        self.notes = notes
        self.shown = {"stdout": 0, "stderr": 0}
        self.last_id: str | None = None

    def follow(self, client: Client, execution_id: str, timeout: float) -> Execution:
        """The final record, once the stream ended with it; ``WaitTimeout`` after
        ``timeout`` seconds. Only a refusal (4xx) or the deadline stops the reconnects."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                for event in client.stream(execution_id, last_event_id=self.last_id, timeout=left):
                    self._show(event)
                    if isinstance(event, EndEvent):
                        return event.execution
            except APIError:
                raise
            except ClientError as exc:
                note(self.options, f"the event stream broke ({exc}); reconnecting")
            if time.monotonic() > deadline:
                record = client.get(execution_id)
                raise WaitTimeout(
                    f"{execution_id} is still {record.status.value} after {timeout:g}s; "
                    f"run `pyexec follow {execution_id}` again to keep waiting",
                    execution=record,
                )
            time.sleep(REOPEN_SECONDS)

    def _show(self, event: StreamEvent) -> None:
        if self.options.json:
            write(sys.stdout, json.dumps(event_json(event), ensure_ascii=False) + "\n")
        if isinstance(event, OutputEvent):
            self.last_id = event.id
            if not self.options.json:
                if event.stream == "stdout":
                    write(sys.stdout, event.text)
                elif not self.options.quiet:
                    write(sys.stderr, event.text)
            self.shown[event.stream] += len(event.text)
        elif isinstance(event, StatusEvent) and self.notes and not self.options.json:
            note(self.options, f"{event.execution.execution_id} {event.execution.status.value}")

    def finish(self, record: Execution) -> None:
        """What is left to print of the final record (``--json``: the end event was it)."""
        if self.options.json:
            return
        if self.notes:
            note(self.options, f"{record.execution_id} {record.status.value}")
        emit_execution(
            self.options, record, skip_stdout=self.shown["stdout"], skip_stderr=self.shown["stderr"]
        )
