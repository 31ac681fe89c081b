"""Signing and verifying pyexec's completion callbacks (standard library only).

When an execution that named a ``callback_url`` ends, pyexec POSTs its final record
there as JSON, with the header::

    X-Pyexec-Signature: t=1764500000,v1=5f2b…

``v1`` is the hex HMAC-SHA256, keyed with the server's ``PYEXEC_CALLBACK_SECRET``, of
the timestamp ``t``, a dot, and the raw body: ``f"{t}.".encode() + body``. A receiver
checks it with :func:`verify` on the body bytes exactly as received::

    from pyexec.webhooks import verify, WebhookVerificationError

    try:
        verify(body, request.headers["X-Pyexec-Signature"], secret)
    except WebhookVerificationError:
        return 400
    record = json.loads(body)

Deliveries are retried, so the same record may arrive more than once: key on its
``execution_id``. The timestamp bounds replays (``tolerance``, 5 minutes by default).
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = [
    "EXECUTION_HEADER",
    "SIGNATURE_HEADER",
    "WebhookVerificationError",
    "sign",
    "verify",
]

SIGNATURE_HEADER = "X-Pyexec-Signature"
#: The execution the callback reports on (also in the body).
EXECUTION_HEADER = "X-Pyexec-Execution-Id"
DEFAULT_TOLERANCE = 300.0


class WebhookVerificationError(ValueError):
    """The signature is missing, malformed, stale, or does not match the body."""


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    message = f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """The ``X-Pyexec-Signature`` value for ``body`` (now, unless ``timestamp`` is given)."""
    when = int(time.time()) if timestamp is None else timestamp
    return f"t={when},v1={_mac(secret, when, body)}"


def verify(
    body: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Check a callback's signature; raises ``WebhookVerificationError`` unless it is good.

    ``body`` is the raw request body; ``header`` the ``X-Pyexec-Signature`` value. Several
    ``v1`` entries are accepted (any one matching is enough), for secret rotation.
    """
    if not header:
        raise WebhookVerificationError(f"no {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1":
            candidates.append(value)
    if timestamp is None or not candidates:
        raise WebhookVerificationError(f"malformed {SIGNATURE_HEADER}: {header[:100]!r}")
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        raise WebhookVerificationError(
            f"signature timestamp {timestamp} is more than {tolerance:g} s from now"
        )
    expected = _mac(secret, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in candidates):
        raise WebhookVerificationError("signature does not match the body")
