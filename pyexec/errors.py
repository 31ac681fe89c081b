"""The one exception tree of the pyexec service.

Every error the service raises on purpose is a ``PyexecError``. Each class
carries the HTTP status it maps to and a stable, machine-readable ``code``;
the mapping to an HTTP response happens in exactly one place
(``pyexec.api.errors``)::

    PyexecError
    ├── BadRequest                 400  invalid_request, unknown_field, invalid_field, invalid_json,
    │   │                               invalid_image, invalid_multipart, invalid_query,
    │   │                               invalid_artifact_pattern, ...
    │   ├── TarRejected            400  tar_invalid, tar_absolute_path, tar_path_traversal,
    │   │                               tar_link_escape, tar_special_file, tar_name_clash,
    │   │                               entrypoint_not_found
    │   ├── LimitExceeded          400  limit_exceeded (asks for more than the server allows)
    │   │                               too_many_artifact_patterns
    │   └── PayloadTooLarge        413  tar_too_large, tar_too_many_entries, tar_too_much_data,
    │                                   code_too_large, metadata_too_large
    ├── Unauthorized               401  unauthorized
    ├── NotFound                   404  execution_not_found, artifact_not_found
    ├── Conflict                   409  invalid_transition, already_exists, idempotency_conflict
    │   └── IdempotentReplay            (internal: a store met a known Idempotency-Key)
    │   └── TransitionRefused      409  invalid_transition (carries the record as it is)
    ├── TooManyExecutions          429  too_many_executions (this replica's in-flight cap)
    ├── TooManySubscribers         429  too_many_subscribers (event streams of one execution)
    └── BackendError               502  store_error, runner_error, nomad_dispatch_failed
        └── BackendUnavailable     503  store_unavailable, runner_unavailable, shutting_down
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .models import Execution

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BadRequest",
    "Conflict",
    "IdempotentReplay",
    "LimitExceeded",
    "NotFound",
    "PayloadTooLarge",
    "PyexecError",
    "TarRejected",
    "TooManyExecutions",
    "TooManySubscribers",
    "TransitionRefused",
    "Unauthorized",
]


class PyexecError(Exception):
    """Root of every error pyexec raises on purpose."""

    status_code: ClassVar[int] = 500
    default_code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(PyexecError):
    status_code = 400
    default_code = "invalid_request"


class TarRejected(BadRequest):
    default_code = "tar_invalid"


class LimitExceeded(BadRequest):
    default_code = "limit_exceeded"


class PayloadTooLarge(BadRequest):
    status_code = 413
    default_code = "payload_too_large"


class Unauthorized(PyexecError):
    status_code = 401
    default_code = "unauthorized"


class NotFound(PyexecError):
    status_code = 404
    default_code = "execution_not_found"


class Conflict(PyexecError):
    status_code = 409
    default_code = "conflict"


class TransitionRefused(Conflict):
    """A store refused a state change; ``current`` is the record as it stands, so the
    caller can answer with it without reading it again."""

    def __init__(self, message: str, *, current: Execution) -> None:
        super().__init__(message, code="invalid_transition", status=current.status.value)
        self.current = current


class IdempotentReplay(Conflict):
    """``Store.create`` found the record's idempotency key taken: by ``execution_id``, for
    a request with ``fingerprint``. The service turns it into that execution, or a 409."""

    def __init__(self, *, execution_id: str, fingerprint: str) -> None:
        super().__init__(
            f"the idempotency key is taken by {execution_id}", code="idempotency_conflict"
        )
        self.execution_id = execution_id
        self.fingerprint = fingerprint


class TooManyExecutions(PyexecError):
    status_code = 429
    default_code = "too_many_executions"


class TooManySubscribers(PyexecError):
    status_code = 429
    default_code = "too_many_subscribers"


class BackendError(PyexecError):
    status_code = 502
    default_code = "backend_error"


class BackendUnavailable(BackendError):
    status_code = 503
    default_code = "backend_unavailable"
