"""The eval API's JSON body: parsed and checked against the server's limits.

The fields eval shares with the tar API (``entrypoint``, ``stdin``,
``env_vars``, ``script_args``, ``requirements_txt``, ``config``) go through
``pyexec.models.parse_request`` so both APIs enforce the same rules; the rest
(``code``/``files``, ``python_version``, ``eval_last_expr``,
``auto_requirements``) is checked here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from pyexec.errors import BadRequest, LimitExceeded, PayloadTooLarge
from pyexec.models import ExecutionRequest, parse_request
from pyexec.settings import Settings

__all__ = ["RESERVED_DIR", "EvalRequest", "parse_eval_request"]

#: Where eval keeps its own files in the archive; user files may not live there.
RESERVED_DIR = ".pyexec"

_FIELDS = frozenset(
    {
        "code", "files", "entrypoint", "stdin", "python_version", "eval_last_expr",
        "env_vars", "script_args", "requirements_txt", "auto_requirements", "config",
        "callback_url", "artifacts", "inline_artifacts",
    }
)  # fmt: skip
_SHARED = (
    "entrypoint", "stdin", "env_vars", "script_args", "requirements_txt", "config", "callback_url",
    "artifacts",
)  # fmt: skip
_FILE_FIELDS = frozenset({"name", "content"})
_DEFAULT_ENTRYPOINT = "main.py"


@attrs.frozen(kw_only=True)
class EvalRequest:
    """A checked eval request: the program's files and how to run them."""

    #: ``(name, content)`` per file, names relative and unique.
    files: tuple[tuple[str, str], ...]
    python_version: str
    eval_last_expr: bool
    auto_requirements: bool
    #: The run as the tar API would take it (image from ``python_version``, the user's
    #: entrypoint and requirements_txt; eval swaps in its own entrypoint later).
    execution: ExecutionRequest
    #: Return artifacts up to ``INLINE_ARTIFACT_BYTES`` each, base64, in the answer.
    inline_artifacts: bool = False

    @property
    def entrypoint(self) -> str:
        return self.execution.entrypoint


def parse_eval_request(raw: Any, settings: Settings) -> EvalRequest:
    """Validate a decoded eval body; raises ``BadRequest`` (400) or ``PayloadTooLarge`` (413)."""
    if not isinstance(raw, Mapping):
        raise BadRequest("the body must be a JSON object", code="invalid_request")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise BadRequest(
            f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(_FIELDS))}",
            code="unknown_field",
            field=unknown[0],
        )
    data = {key: value for key, value in raw.items() if value is not None}

    version = _python_version(data, settings)
    shared = {key: data[key] for key in _SHARED if key in data}
    shared["docker_image"] = dict(settings.python_images)[version]
    execution = parse_request(shared, settings)
    files = _files(data, execution.entrypoint, explicit_entrypoint="entrypoint" in data)
    _check_size(files, settings.max_eval_code_bytes)
    return EvalRequest(
        files=files,
        python_version=version,
        eval_last_expr=_flag(data, "eval_last_expr", default=False),
        auto_requirements=_auto_requirements(data, settings),
        execution=execution,
        inline_artifacts=_flag(data, "inline_artifacts", default=False),
    )


def _auto_requirements(data: Mapping[str, Any], settings: Settings) -> bool:
    """On by default where setup has the network (an install could only fail without);
    asked for explicitly where it has none, refused rather than silently dropped."""
    wanted = _flag(data, "auto_requirements", default=settings.eval_auto_requirements)
    # Without a setup network only the operator's prewarmed sets can be had (eval.prepare).
    if wanted and not settings.setup_network and not settings.deps_prewarm:
        if "auto_requirements" in data:
            raise LimitExceeded(
                "this server gives the setup phase no network (PYEXEC_SETUP_NETWORK), so "
                "auto_requirements cannot install anything",
                code="setup_network_unavailable",
                field="auto_requirements",
            )
        return False
    return wanted


def _python_version(data: Mapping[str, Any], settings: Settings) -> str:
    supported = [version for version, _ in settings.python_images]
    version = data.get("python_version", settings.default_python_version)
    if not isinstance(version, str):
        # A JSON number cannot say 3.10 (it would read 3.1), so only strings are taken.
        raise BadRequest(
            f'python_version must be a string such as "{supported[-1] if supported else "3.12"}"',
            code="invalid_field",
            field="python_version",
        )
    if version not in supported:
        raise BadRequest(
            f"python_version {version!r} is not supported here; supported: {', '.join(supported)}",
            code="unsupported_python_version",
            field="python_version",
            supported=supported,
        )
    return version


def _flag(data: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false", code="invalid_field", field=key)
    return value


def _files(
    data: Mapping[str, Any], entrypoint: str, *, explicit_entrypoint: bool
) -> tuple[tuple[str, str], ...]:
    if ("code" in data) == ("files" in data):
        if "code" in data:
            raise BadRequest(
                "give either code or files, not both", code="code_and_files", field="code"
            )
        raise BadRequest("give code (one file) or files (a project)", code="missing_code")
    if "code" in data:
        code = data["code"]
        if not isinstance(code, str):
            raise BadRequest("code must be a string", code="invalid_field", field="code")
        # The code is the entrypoint: main.py unless the request names another file.
        name = entrypoint if explicit_entrypoint else _DEFAULT_ENTRYPOINT
        return ((_file_name(name, "entrypoint"), _text(code, "code")),)

    items = data["files"]
    if not isinstance(items, list) or not items:
        raise BadRequest(
            "files must be a non-empty list of {name, content}", code="invalid_field", field="files"
        )
    files: dict[str, str] = {}
    for index, item in enumerate(items):
        where = f"files[{index}]"
        if not isinstance(item, Mapping):
            raise BadRequest(f"{where} must be an object", code="invalid_field", field=where)
        unknown = sorted(set(item) - _FILE_FIELDS)
        if unknown:
            raise BadRequest(
                f"unknown field {where}.{unknown[0]}; allowed: content, name",
                code="unknown_field",
                field=f"{where}.{unknown[0]}",
            )
        raw_name, content = item.get("name"), item.get("content")
        if not isinstance(raw_name, str) or not isinstance(content, str):
            raise BadRequest(
                f"{where} needs a string name and a string content",
                code="invalid_field",
                field=where,
            )
        name = _file_name(raw_name, f"{where}.name")
        if name in files:
            raise BadRequest(f"{where}: {name} appears twice", code="duplicate_file", field=where)
        files[name] = _text(content, f"{where}.content")
    _check_tree(files)
    if entrypoint not in files:
        raise BadRequest(
            f"the entrypoint {entrypoint} is not among files", code="entrypoint_not_found"
        )
    return tuple(files.items())


def _file_name(name: str, field: str) -> str:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or any(part in {"", ".", ".."} for part in parts)
    ):
        raise BadRequest(
            f"{field} {name!r} must be a relative path such as pkg/util.py",
            code="invalid_file_name",
            field=field,
        )
    if parts[0] == RESERVED_DIR:
        raise BadRequest(
            f"{field} {name!r}: {RESERVED_DIR}/ is reserved for eval's own files",
            code="reserved_name",
            field=field,
        )
    return name


def _text(value: str, field: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"{field} is not valid text (lone surrogate)", code="invalid_field", field=field
        ) from None
    return value


def _check_tree(files: Mapping[str, str]) -> None:
    """No name may be both a file and a directory (``a`` and ``a/b.py``)."""
    for name in files:
        parts = name.split("/")
        for size in range(1, len(parts)):
            parent = "/".join(parts[:size])
            if parent in files:
                raise BadRequest(
                    f"{parent} is a file, so {name} cannot be inside it",
                    code="invalid_file_name",
                    field="files",
                )


def _check_size(files: tuple[tuple[str, str], ...], limit: int) -> None:
    total = sum(len(content.encode("utf-8")) for _, content in files)
    if total > limit:
        raise PayloadTooLarge(
            f"the code is {total} bytes; this server takes at most {limit}",
            code="code_too_large",
            size=total,
            maximum=limit,
        )
