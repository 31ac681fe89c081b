"""The OpenAPI 3.1 document of the HTTP API (validated in tests)."""

from __future__ import annotations

import copy
import functools
from typing import Any

from pyexec.__about__ import __version__
from pyexec.execution_service import MAX_POLL_SECONDS
from pyexec.models import EXECUTION_ID, Reason, Status
from pyexec.sandbox.collect import MAX_PATTERNS
from pyexec.settings import CONFIG_FIELDS, CONFIG_MINIMA, Settings

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Invalid request (unknown field, bad value, rejected tar)",
        401: "Missing or invalid bearer token",
        404: "No such execution (or artifact: artifact_not_found)",
        409: "The Idempotency-Key was used for a different request (idempotency_conflict)",
        413: "Archive or code too large",
        429: "This replica runs as many executions as it may; retry later",
        502: "A backend failed",
        503: "A backend is unreachable or the service is shutting down",
    }
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


_CONFIG = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "network_disabled": {"type": "boolean", "default": True},
        **{key: {"type": "integer", "minimum": low} for key, low in CONFIG_MINIMA.items()},
    },
}

_STRINGS = {"type": "array", "items": {"type": "string"}}

_CALLBACK_URL = {
    "type": "string",
    "format": "uri",
    "description": "POSTed the final record, signed (X-Pyexec-Signature), when the execution "
    "ends; its host must be in PYEXEC_CALLBACK_ALLOWED_HOSTS",
}

_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "The same key with the same request returns the same execution (the code "
    "runs once, on any replica); with another request, 409 idempotency_conflict. Expires "
    "with the execution's record.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}

_ARTIFACT_PATTERNS = {
    **_STRINGS,
    "maxItems": MAX_PATTERNS,
    "description": "Glob patterns, relative to the working directory, of output files to "
    "collect after the run whatever its verdict (`*`, `?`, `[...]` within a path part; a "
    "`**` part spans directories). Absolute or `..` patterns: 400 invalid_artifact_pattern; "
    "more than the maximum: 400 too_many_artifact_patterns. See docs/artifacts.md.",
    "examples": [["out/*.png", "results/**"]],
}

_METADATA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string", "default": "main.py"},
        "docker_image": {"type": "string"},
        "requirements_txt": {"type": "string"},
        "pre_commands": _STRINGS,
        "stdin": {"type": "string"},
        "env_vars": {**_STRINGS, "description": "KEY=value entries"},
        "script_args": _STRINGS,
        "config": _ref("Config"),
        "callback_url": _CALLBACK_URL,
        "artifacts": _ARTIFACT_PATTERNS,
    },
}

_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}

_EXECUTION = {
    "type": "object",
    "required": ["execution_id", "status", "stdout", "stderr", "exit_code", "reason"],
    "properties": {
        "execution_id": {"type": "string", "pattern": "^exe_"},
        "status": {"type": "string", "enum": [s.value for s in Status]},
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "exit_code": {"type": ["integer", "null"]},
        "started_at": _NULLABLE_TIME,
        "finished_at": _NULLABLE_TIME,
        "created_at": {"type": "string", "format": "date-time"},
        "duration_ms": {"type": ["integer", "null"]},
        "error": _NULLABLE_STR,
        "reason": {"type": ["string", "null"], "enum": [*(r.value for r in Reason), None]},
        "output_truncated": {"type": "boolean"},
        "result": {**_NULLABLE_STR, "description": "eval: repr of the last expression"},
        "error_type": {**_NULLABLE_STR, "description": "eval: exception class name"},
        "error_line": {"type": ["integer", "null"], "description": "eval: line in entrypoint"},
        "auto_requirements": {**_STRINGS, "description": "eval: distributions auto-installed"},
        "deps_cache": {
            "type": "string",
            "enum": ["hit", "miss", "off"],
            "description": "requirements from a cached environment (hit, miss: built for this "
            "run) or installed by the run itself (off); absent without requirements",
        },
        "callback": {
            "type": "object",
            "description": "delivery of the completion callback, when callback_url was given",
            "properties": {
                "status": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                "attempts": {"type": "integer"},
                "last_error": _NULLABLE_STR,
            },
        },
        "artifacts": {
            "type": "array",
            "description": "Output files collected (regular files only, in path order)",
            "items": {
                "type": "object",
                "required": ["path", "size", "sha256"],
                "properties": {
                    "path": {"type": "string"},
                    "size": {"type": "integer"},
                    "sha256": {"type": "string"},
                    "content_base64": {
                        "type": "string",
                        "description": "eval with inline_artifacts: the bytes (files up to 1 MiB)",
                    },
                },
            },
        },
        "artifacts_truncated": {
            "type": "boolean",
            "description": "Some matching files were left out (config.max_artifact_bytes, "
            "the file count, or a run whose files could not be collected)",
        },
    },
}

_EVAL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "code": {"type": "string", "description": "Becomes main.py; exclusive with files"},
        "files": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "content"],
                "properties": {"name": {"type": "string"}, "content": {"type": "string"}},
            },
        },
        "entrypoint": {"type": "string"},
        "stdin": {"type": "string"},
        "python_version": {"type": "string", "examples": ["3.12"]},
        "eval_last_expr": {"type": "boolean", "default": False},
        "auto_requirements": {"type": "boolean"},
        "env_vars": _STRINGS,
        "script_args": _STRINGS,
        "requirements_txt": {"type": "string"},
        "config": _ref("Config"),
        "callback_url": _CALLBACK_URL,
        "artifacts": _ARTIFACT_PATTERNS,
        "inline_artifacts": {
            "type": "boolean",
            "default": False,
            "description": "Return each artifact up to 1 MiB base64-encoded in the answer "
            "(content_base64)",
        },
    },
}

_UPLOAD = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["tar"],
                "properties": {
                    "tar": {
                        "type": "string",
                        "format": "binary",
                        "description": "uncompressed tar",
                    },
                    "metadata": {"type": "string", "description": "ExecutionMetadata as JSON"},
                },
            },
            "encoding": {"metadata": {"contentType": "application/json"}},
        }
    },
}

_SUBMITTED = {
    "type": "object",
    "properties": {"execution_id": {"type": "string"}, "status": {"type": "string"}},
}

_ID_PARAM = {
    "name": "execution_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": EXECUTION_ID.pattern},
}


_EVENTS = {
    "get": {
        "summary": "Live output: status changes and output as server-sent events",
        "description": "A `text/event-stream` of `status` (each state change while pending "
        "or running; data: the record), `stdout` and `stderr` (data: `{offset, text}`, the "
        "byte offset in that stream and the output as produced, whole UTF-8 characters) and "
        "last `end` (data: the final record), after which the stream closes. Each output "
        "event's `id` is `<stdout bytes>-<stderr bytes>` sent up to and including it: "
        "reconnecting with `Last-Event-ID` continues exactly there. A finished execution "
        "replays its whole (capped) output, then `end`. A comment line every 15 s keeps a "
        "quiet stream open. See docs/events.md.",
        "operationId": "streamEvents",
        "parameters": [
            _ID_PARAM,
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "description": "Resume after this event (the `id` of the last event received)",
                "schema": {"type": "string", "pattern": r"^(\d{1,15}-\d{1,15})?$"},
            },
        ],
        "responses": {
            "200": {
                "description": "The event stream",
                "content": {
                    "text/event-stream": {
                        # One event (OpenAPI 3.1 has no itemSchema: schema is per event).
                        "schema": {
                            "type": "object",
                            "required": ["event", "data"],
                            "properties": {
                                "event": {"enum": ["status", "stdout", "stderr", "end"]},
                                "data": {"type": "string", "contentMediaType": "application/json"},
                                "id": {"type": "string", "pattern": r"^\d+-\d+$"},
                                "retry": {"type": "integer"},
                            },
                        }
                    }
                },
            },
            **_errors(400, 401, 404),
            "429": _json(
                _ref("Error"),
                "The execution has as many event streams on this replica as it may "
                "(too_many_subscribers; PYEXEC_MAX_EVENT_SUBSCRIBERS); retry later",
            ),
            **_errors(503),
        },
    }
}


@functools.lru_cache(maxsize=8)
def openapi_document(settings: Settings | None = None) -> dict[str, Any]:
    """The API's document; with ``settings``, narrowed to what that server accepts (its
    maxima, images, python versions, network policy), as ``/openapi.json`` serves it."""
    document = copy.deepcopy(_document())  # narrowing must not touch the shared parts
    if settings is not None:
        _narrow(document["components"]["schemas"], settings)
    return document


def _narrow(schemas: dict[str, Any], settings: Settings) -> None:
    config = schemas["Config"]["properties"]
    for key, (_, maximum) in CONFIG_FIELDS.items():
        config[key]["maximum"] = getattr(settings, maximum)
    if not settings.allow_network:
        config["network_disabled"]["const"] = True
    metadata, eval_request = schemas["ExecutionMetadata"], schemas["EvalRequest"]
    if "*" not in settings.allowed_images:
        images = {settings.default_image, *settings.allowed_images}
        images.update(image for _, image in settings.python_images)
        metadata["properties"]["docker_image"]["enum"] = sorted(images)
    versions = [version for version, _ in settings.python_images]
    eval_request["properties"]["python_version"]["enum"] = versions
    if not settings.setup_network:
        blank = {"pattern": r"^\s*$", "description": "no setup network here: blank only"}
        metadata["properties"]["requirements_txt"].update(blank)
        eval_request["properties"]["requirements_txt"].update(blank)
        eval_request["properties"]["auto_requirements"]["const"] = False


def _document() -> dict[str, Any]:
    execution = _json(_ref("Execution"), "The execution record")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pyexec",
            "version": __version__,
            "description": "Run untrusted Python in locked-down containers.",
        },
        "components": {
            "schemas": {
                "Config": _CONFIG,
                "ExecutionMetadata": _METADATA,
                "Execution": _EXECUTION,
                "EvalRequest": _EVAL,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                                "details": {"type": "object"},
                            },
                        }
                    },
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": {
            "/api/v1/exec/sync": {
                "post": {
                    "summary": "Run a tar and wait for the result",
                    "operationId": "execSync",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": _UPLOAD,
                    "responses": {"200": execution, **_errors(400, 401, 409, 413, 429, 502, 503)},
                }
            },
            "/api/v1/exec/async": {
                "post": {
                    "summary": "Start a tar; poll the execution for the result",
                    "operationId": "execAsync",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": _UPLOAD,
                    "responses": {
                        "202": _json(_SUBMITTED, "Accepted"),
                        **_errors(400, 401, 409, 413, 429, 502, 503),
                    },
                }
            },
            "/api/v1/executions/{execution_id}": {
                "get": {
                    "summary": "Read an execution (optionally long-poll until it is finished)",
                    "operationId": "getExecution",
                    "parameters": [
                        _ID_PARAM,
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "number", "minimum": 0, "maximum": MAX_POLL_SECONDS},
                        },
                    ],
                    "responses": {"200": execution, **_errors(400, 401, 404, 503)},
                },
                "delete": {
                    "summary": "Kill an execution (a finished one is returned unchanged)",
                    "operationId": "killExecution",
                    "parameters": [_ID_PARAM],
                    "responses": {"200": execution, **_errors(401, 404, 502, 503)},
                },
            },
            "/api/v1/executions/{execution_id}/logs": {
                "get": {
                    "summary": "Output so far",
                    "operationId": "getLogs",
                    "parameters": [_ID_PARAM],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "execution_id": {"type": "string"},
                                    "status": {"type": "string"},
                                    "stdout": {"type": "string"},
                                    "stderr": {"type": "string"},
                                    "output_truncated": {"type": "boolean"},
                                },
                            },
                            "Output",
                        ),
                        **_errors(401, 404, 503),
                    },
                }
            },
            "/api/v1/executions/{execution_id}/events": _EVENTS,
            "/api/v1/executions/{execution_id}/artifacts": {
                "get": {
                    "summary": "Every artifact of an execution as one uncompressed tar",
                    "operationId": "getArtifacts",
                    "parameters": [_ID_PARAM],
                    "responses": {
                        "200": {
                            "description": "A tar of the listed files (empty when none)",
                            "content": {
                                "application/x-tar": {
                                    "schema": {"type": "string", "format": "binary"}
                                }
                            },
                        },
                        **_errors(401, 404, 502, 503),
                    },
                }
            },
            "/api/v1/executions/{execution_id}/artifacts/{path}": {
                "get": {
                    "summary": "One artifact, by its path as the record lists it",
                    "operationId": "getArtifact",
                    "parameters": [
                        _ID_PARAM,
                        {
                            "name": "path",
                            "in": "path",
                            "required": True,
                            "description": "The artifact's path (slashes included)",
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "The file; its content type from its name",
                            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                        },
                        **_errors(401, 404, 502, 503),
                    },
                }
            },
            "/api/v1/eval": {
                "post": {
                    "summary": "Run code given as JSON and wait for the result",
                    "operationId": "eval",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("EvalRequest")}},
                    },
                    "responses": {"200": execution, **_errors(400, 401, 409, 413, 429, 502, 503)},
                }
            },
            "/api/v1/eval/async": {
                "post": {
                    "summary": "Start code given as JSON; poll the execution for the result",
                    "operationId": "evalAsync",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("EvalRequest")}},
                    },
                    "responses": {
                        "202": _json(_SUBMITTED, "Accepted"),
                        **_errors(400, 401, 409, 413, 429, 502, 503),
                    },
                }
            },
            "/api/v1/version": {
                "get": {
                    "summary": "Server version and backend",
                    "operationId": "version",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "version": {"type": "string"},
                                    "backend": {"type": "string"},
                                },
                            },
                            "Version",
                        )
                    },
                }
            },
            "/health/live": {
                "get": {
                    "summary": "Liveness: the process answers (backends not consulted)",
                    "operationId": "liveness",
                    "security": [{}],
                    "responses": {"200": {"description": "Alive"}},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/health": {
                "get": {
                    "summary": "Readiness: store and runner reachability",
                    "operationId": "health",
                    "security": [{}],
                    "responses": {
                        "200": {
                            "description": "All backends reachable (`degraded`: a warm "
                            "pool is empty, runs take the cold path; `pool` says which)"
                        },
                        "503": {"description": "A backend is unreachable"},
                    },
                }
            },
        },
    }
