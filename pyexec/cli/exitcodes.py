"""Exit codes of the ``pyexec`` command (documented in ``docs/cli.md``).

A script that ran to its end passes its own exit code through. Everything else
gets a code of its own, chosen from the ones shells already use for the same
meaning, so a wrapper script can tell "my script exited 1" from "the run timed out".
"""

from __future__ import annotations

from pyexec.client import Execution, Reason, Status

__all__ = [
    "GAVE_UP_WAITING",
    "KILLED",
    "OOM",
    "OUTPUT_LIMIT",
    "PYEXEC_ERROR",
    "SETUP_FAILED",
    "TIMEOUT",
    "USAGE",
    "for_execution",
]

#: Bad command-line arguments or local input (no entrypoint, empty stdin, unset --env KEY).
USAGE = 2
#: The client stopped waiting (``follow --timeout``); the execution is still going.
GAVE_UP_WAITING = 75
#: The run hit its time limit (like coreutils ``timeout``).
TIMEOUT = 124
#: pyexec itself failed: server unreachable, request rejected, unauthorized, backend error.
PYEXEC_ERROR = 125
#: Installing requirements or a pre-command failed, so the script never ran.
SETUP_FAILED = 126
#: Someone killed the execution (``pyexec kill`` or DELETE), like a Ctrl-C'd process.
KILLED = 130
#: The run went over its memory limit (like a SIGKILL'd process).
OOM = 137
#: The run wrote more output than allowed (like a SIGPIPE'd process).
OUTPUT_LIMIT = 141

_BY_REASON = {
    Reason.TIMEOUT: TIMEOUT,
    Reason.OOM: OOM,
    Reason.OUTPUT_LIMIT: OUTPUT_LIMIT,
    Reason.KILLED: KILLED,
    Reason.SETUP_FAILED: SETUP_FAILED,
    Reason.ERROR: PYEXEC_ERROR,
}


def for_execution(record: Execution) -> int:
    """The exit code ``pyexec`` ends with for a terminal ``record``."""
    if record.status is Status.COMPLETED and record.exit_code is not None:
        return record.exit_code
    if record.status is Status.KILLED:
        return KILLED
    if record.reason is not None and record.reason in _BY_REASON:
        return _BY_REASON[record.reason]
    return PYEXEC_ERROR
