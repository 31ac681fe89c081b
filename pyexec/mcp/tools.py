"""pyexec's MCP tools: ``run_python``, ``run_python_async``, ``get_execution``, ``kill_execution``.

The tools are a client of the pyexec HTTP API (``pyexec.client.AsyncClient``), whichever
transport carries them: over stdio the client talks to a remote server; mounted in
``pyexec serve`` it talks to the app it is mounted in. So every rule (limits, bad input,
auth) is the API's, once.
"""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from pyexec.__about__ import __version__
from pyexec.client import AsyncClient, ClientError, Execution, RunOptions

__all__ = ["Connect", "ExecutionResult", "Submitted", "artifact_content", "build_server"]

#: Opens a client for one tool call; it gets the call's HTTP headers (``None`` over stdio).
Connect = Callable[[Mapping[str, str] | None], AbstractAsyncContextManager[AsyncClient]]

SANDBOX = """\
The code runs in a fresh, locked-down Linux container (no capabilities) with CPython
(the server's default version unless python_version says otherwise), in /work. It has
NO network access while it runs: requirements are installed before, in a setup phase. It has a time
limit (timeout_seconds, else the server's default) and a memory limit; a run that hits
one ends with verdict "timeout" or "oom" instead of "exited". Nothing persists between
calls: each call starts from an empty /work."""

RESULT = """\
Returns stdout, stderr, exit_code, verdict (exited | timeout | oom | output_limit |
killed | setup_failed | error) and, when the last statement is an expression, its repr in
`result` (like a REPL: `x = 5\\nx * 2` gives "10"). When the code raises, exit_code is 1,
stderr holds the usual Python traceback, and error_type / error_line name the exception
class and the line of your code (e.g. "ZeroDivisionError", 3). A verdict "setup_failed"
means a requirement could not be installed; "error" means pyexec itself failed (see
`error`). Bad arguments (both code and files, an unknown python_version) come back as a
tool error with a message."""

RUN_DESCRIPTION = f"""\
Run Python code and wait for it to finish.

Pass `code` (one script, run as main.py) or `files` (path -> content, with `entrypoint`
naming the file to run, default main.py). Optional: stdin text, command-line args,
requirements (pip specifiers such as "numpy" or "requests==2.32.3"; imports of
well-known packages are also installed automatically), timeout_seconds.

{SANDBOX}

{RESULT}"""

ASYNC_DESCRIPTION = f"""\
Start running Python code without waiting; returns an execution_id at once. Takes the same
arguments as run_python. Use it for work that may take longer than a minute or two, then
call get_execution (optionally with wait_seconds) to read the result, or kill_execution to
stop it.

{SANDBOX}"""

GET_DESCRIPTION = f"""\
Read an execution started with run_python_async. status is pending or running while it
goes on, then completed (the program exited by itself, with any exit code), failed or
killed. wait_seconds (at most 60) holds the answer until the execution ends or that time
passes. An unknown or expired execution_id is a tool error.

{RESULT}"""

KILL_DESCRIPTION = """\
Stop an execution started with run_python_async. Killing one that already finished is not
an error: its final record comes back unchanged. Returns the record, as get_execution."""


class ExecutionResult(BaseModel):
    """One execution as the tools report it."""

    execution_id: str = Field(description="Id for get_execution and kill_execution.")
    status: str = Field(description="pending, running, completed, failed or killed.")
    verdict: str | None = Field(
        None,
        description="How it ended: exited, timeout, oom, output_limit, killed, setup_failed, "
        "error. None while it runs.",
    )
    exit_code: int | None = Field(None, description="The process's exit code, if it exited.")
    stdout: str = ""
    stderr: str = ""
    result: str | None = Field(None, description="repr of the last expression's value.")
    error_type: str | None = Field(None, description="Class name of the uncaught exception.")
    error_line: int | None = Field(None, description="Line of the code where it failed.")
    error: str | None = Field(None, description="What failed inside pyexec, if anything did.")
    output_truncated: bool = Field(False, description="stdout/stderr were cut at the limit.")
    duration_ms: int | None = None
    artifacts: list[dict[str, Any]] = Field(
        default_factory=list, description="Files brought back: path, size, sha256."
    )
    artifacts_truncated: bool = Field(False, description="Some files were left out (size cap).")


class Submitted(BaseModel):
    execution_id: str
    status: str


def artifact_content(record: Execution) -> list[ContentBlock]:
    """Content blocks for the files a run produced: an image as ``ImageContent`` (what a
    model can look at), UTF-8 text as text; any other file, and one whose bytes did not
    come inline (over 1 MiB, or read with get_execution), as a line naming it."""
    blocks: list[ContentBlock] = []
    for item in record.artifacts:
        kind = mimetypes.guess_type(item.path, strict=False)[0] or ""
        data = item.content
        if data is not None and kind.startswith("image/"):
            encoded = base64.b64encode(data).decode("ascii")
            blocks.append(ImageContent(type="image", data=encoded, mime_type=kind))
            continue
        text = _as_text(data) if data is not None else None
        if text is not None:
            blocks.append(TextContent(type="text", text=f"--- artifact {item.path} ---\n{text}"))
            continue
        blocks.append(
            TextContent(
                type="text",
                text=f"artifact {item.path}: {item.size} bytes, sha256 {item.sha256} "
                f"(GET /api/v1/executions/{record.execution_id}/artifacts/{item.path})",
            )
        )
    return blocks


def _as_text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if "\x00" not in text else None


def _result(record: Execution) -> ExecutionResult:
    return ExecutionResult(
        execution_id=record.execution_id,
        status=record.status.value,
        verdict=record.reason.value if record.reason else None,
        exit_code=record.exit_code,
        stdout=record.stdout,
        stderr=record.stderr,
        result=record.result,
        error_type=record.error_type,
        error_line=record.error_line,
        error=record.error,
        output_truncated=record.output_truncated,
        duration_ms=record.duration_ms,
        artifacts=[{"path": a.path, "size": a.size, "sha256": a.sha256} for a in record.artifacts],
        artifacts_truncated=record.artifacts_truncated,
    )


def _summary(result: ExecutionResult) -> str:
    """The record as text, for clients that show models the text content only."""
    head = [f"status: {result.status}"]
    for key in ("verdict", "exit_code", "result", "error_type", "error_line", "error"):
        value = getattr(result, key)
        if value is not None:
            head.append(f"{key}: {value}")
    if result.output_truncated:
        head.append("output_truncated: true")
    head.append(f"execution_id: {result.execution_id}")
    parts = ["\n".join(head)]
    if result.stdout:
        parts.append(f"--- stdout ---\n{result.stdout}")
    if result.stderr:
        parts.append(f"--- stderr ---\n{result.stderr}")
    return "\n".join(parts)


def _tool_result(record: Execution) -> CallToolResult:
    result = _result(record)
    content: list[ContentBlock] = [TextContent(type="text", text=_summary(result))]
    return CallToolResult(
        content=[*content, *artifact_content(record)],
        structured_content=result.model_dump(mode="json"),
    )


def _options(
    *,
    entrypoint: str | None,
    stdin: str | None,
    args: list[str] | None,
    requirements: list[str] | None,
    timeout_seconds: int | None,
    artifacts: list[str] | None = None,
) -> RunOptions:
    return RunOptions(
        entrypoint=entrypoint,
        stdin=stdin,
        args=tuple(args or ()),
        requirements="\n".join(requirements) + "\n" if requirements else None,
        timeout=timeout_seconds,
        artifacts=tuple(artifacts or ()),
    )


def _source(code: str | None, files: dict[str, str] | None) -> str | dict[str, str]:
    # Exactly one is required; the API says which mistake was made (code_and_files,
    # missing_code), so only the shape is decided here.
    if code is not None and files is None:
        return code
    if files is not None and code is None:
        return files
    raise ToolError(
        "pass either `code` (one script) or `files` (path -> content), not both and not neither"
    )


def _tool_error(exc: ClientError) -> ToolError:
    return ToolError(f"pyexec refused or failed: {exc}")


Code = Annotated[str | None, Field(description="Python source, run as main.py.")]
Files = Annotated[
    dict[str, str] | None,
    Field(
        description="A project instead of code: relative path -> file content, "
        'e.g. {"main.py": "import util", "util.py": "..."}.'
    ),
]
Entrypoint = Annotated[
    str | None, Field(description="With files: the file to run (default main.py).")
]
Stdin = Annotated[str | None, Field(description="Text given to the program on stdin.")]
Args = Annotated[list[str] | None, Field(description="Command-line arguments (sys.argv[1:]).")]
Requirements = Annotated[
    list[str] | None, Field(description='pip requirement specifiers, e.g. ["numpy", "pandas<3"].')
]
Timeout = Annotated[
    int | None, Field(description="Time limit of the run, seconds (server default if unset).")
]
PythonVersion = Annotated[str | None, Field(description='e.g. "3.12" (server default if unset).')]
Artifacts = Annotated[
    list[str] | None,
    Field(
        description="Files the code writes to bring back, as globs relative to /work, e.g. "
        '["*.png", "out/**"]; run_python returns images as image content and text files '
        "as text (up to 1 MiB each)."
    ),
]


def build_server(connect: Connect) -> MCPServer[Any]:
    """The MCP server with pyexec's tools; ``connect`` opens the client each call uses."""
    server: MCPServer[Any] = MCPServer(
        "pyexec",
        version=__version__,
        # The SDK configures logging only where nothing else has (``pyexec mcp``): there,
        # stderr gets warnings, not a line per HTTP request to the pyexec server.
        log_level="WARNING",
        instructions="Run Python code in a sandbox: run_python for quick work, "
        "run_python_async + get_execution for long work.",
    )

    async def call(ctx: Context, action: Callable[[AsyncClient], Any]) -> Any:
        async with connect(ctx.headers) as client:
            try:
                return await action(client)
            except ClientError as exc:
                raise _tool_error(exc) from None
            except ValueError as exc:  # refused locally, e.g. a malformed execution id
                raise ToolError(str(exc)) from None

    @server.tool(
        description=RUN_DESCRIPTION,
        annotations=ToolAnnotations(title="Run Python", open_world_hint=False),
    )
    async def run_python(
        ctx: Context,
        code: Code = None,
        files: Files = None,
        entrypoint: Entrypoint = None,
        stdin: Stdin = None,
        args: Args = None,
        requirements: Requirements = None,
        timeout_seconds: Timeout = None,
        python_version: PythonVersion = None,
        artifacts: Artifacts = None,
    ) -> Annotated[CallToolResult, ExecutionResult]:
        source = _source(code, files)
        options = _options(
            entrypoint=entrypoint,
            stdin=stdin,
            args=args,
            requirements=requirements,
            timeout_seconds=timeout_seconds,
            artifacts=artifacts,
        )
        record: Execution = await call(
            ctx,
            lambda client: client.eval(
                source,
                python_version=python_version,
                last_expr=True,
                options=options,
                inline_artifacts=bool(artifacts) or None,
            ),
        )
        return _tool_result(record)

    @server.tool(
        description=ASYNC_DESCRIPTION,
        annotations=ToolAnnotations(title="Start Python", open_world_hint=False),
    )
    async def run_python_async(
        ctx: Context,
        code: Code = None,
        files: Files = None,
        entrypoint: Entrypoint = None,
        stdin: Stdin = None,
        args: Args = None,
        requirements: Requirements = None,
        timeout_seconds: Timeout = None,
        python_version: PythonVersion = None,
        artifacts: Artifacts = None,
    ) -> Submitted:
        source = _source(code, files)
        options = _options(
            entrypoint=entrypoint,
            stdin=stdin,
            args=args,
            requirements=requirements,
            timeout_seconds=timeout_seconds,
            artifacts=artifacts,
        )
        submitted = await call(
            ctx,
            lambda client: client.submit_eval(
                source, python_version=python_version, last_expr=True, options=options
            ),
        )
        return Submitted(execution_id=submitted.execution_id, status=submitted.status.value)

    @server.tool(
        description=GET_DESCRIPTION,
        annotations=ToolAnnotations(title="Read execution", read_only_hint=True),
    )
    async def get_execution(
        ctx: Context,
        execution_id: str,
        wait_seconds: Annotated[
            int, Field(ge=0, le=60, description="Hold the answer until it ends, up to this long.")
        ] = 0,
    ) -> Annotated[CallToolResult, ExecutionResult]:
        record: Execution = await call(
            ctx, lambda client: client.get(execution_id, wait=wait_seconds)
        )
        return _tool_result(record)

    @server.tool(
        description=KILL_DESCRIPTION,
        annotations=ToolAnnotations(
            title="Stop execution", destructive_hint=True, idempotent_hint=True
        ),
    )
    async def kill_execution(
        ctx: Context, execution_id: str
    ) -> Annotated[CallToolResult, ExecutionResult]:
        record: Execution = await call(ctx, lambda client: client.kill(execution_id))
        return _tool_result(record)

    return server
