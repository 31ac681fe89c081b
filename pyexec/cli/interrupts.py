"""Running to the end, and stopping cleanly when ``pyexec`` is interrupted.

``pyexec run`` and ``pyexec eval`` submit the program and long-poll for its end instead of
holding one synchronous request open: they know the execution id all along, so Ctrl-C or a
SIGTERM (a CI job cancelled, a ``timeout`` wrapper) kills the execution on the server
before ``pyexec`` exits, rather than leaving it running unseen.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType

from pyexec.client import Client, ClientError, Execution, Status

__all__ = ["Interrupted", "run_to_end", "sigterm_interrupts"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; ``str()`` says what was done about the execution (exit 130)."""


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM interrupts like Ctrl-C (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise Interrupted("terminated")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_to_end(
    client: Client,
    submit: Callable[[], str],
    wait_seconds: float,
    on_submitted: Callable[[str], None] = lambda execution_id: None,
    follow: Callable[[str, float], Execution] | None = None,
) -> Execution:
    """Start an execution with ``submit`` (which returns its id) and wait until it is
    terminal, for up to ``wait_seconds`` (as long as a sync run would); ``follow``
    (id, seconds) waits instead of ``client.wait`` (``pyexec run`` prints live).

    Interrupted once the server knows the execution, it kills it before re-raising.
    """
    with sigterm_interrupts():
        execution_id = submit()
        try:
            on_submitted(execution_id)
            if follow is not None:
                return follow(execution_id, wait_seconds)
            return client.wait(execution_id, timeout=wait_seconds)
        except KeyboardInterrupt as exc:
            what = str(exc) or "interrupted"
            raise Interrupted(f"{what}; {_kill(client, execution_id)}") from None


def _kill(client: Client, execution_id: str) -> str:
    """Kill ``execution_id``; says what happened (a failure is reported, not raised)."""
    try:
        record = client.kill(execution_id)
    except ClientError as exc:
        return f"could not kill {execution_id}, it may still be running: {exc}"
    if record.status is not Status.KILLED:
        return f"{execution_id} had already finished ({record.status.value})"
    return f"killed {execution_id}"
