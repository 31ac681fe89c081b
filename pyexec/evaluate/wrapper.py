"""The program eval runs inside the sandbox in place of the user's entrypoint.

This file is not imported by the service: ``pyexec.evaluate.archive`` ships its
text into the archive as ``.pyexec/eval.py`` with a ``main({...})`` call
appended, and the runner starts that as the entrypoint. So it must run on every
Python eval supports (3.10 and later) with the standard library alone, and it
imports as little as it can: a module it imports before the user's code runs is
one a local file of the same name can no longer shadow, which would make the
user's program behave differently than under ``python3 main.py``.

What it does, in order:

1. compiles the user's entrypoint with its real path as the file name (so
   tracebacks, ``inspect`` and ``linecache`` see the user's file), allowing
   top-level ``await``; with ``eval_last_expr`` a final expression statement is
   split off and compiled on its own;
2. makes a fresh ``__main__`` module for it and sets ``sys.argv``,
   ``sys.path[0]`` and ``__file__`` the way ``python3 <entrypoint>`` would;
3. runs it (inside one ``asyncio.run`` when it awaits at top level), then
   evaluates the final expression in the same namespace and takes its ``repr``;
4. on an uncaught exception prints the traceback from the user's first frame on
   (this file's frames hidden) through ``sys.excepthook`` and exits 1;
5. reports ``{"result", "error_type", "error_line"}`` as one marked line on file
   descriptor 2; the service strips that line again (``pyexec.evaluate.outcome``).
   The mark is fixed, so the service can read the report from a stored record
   alone; a program that forges one only changes its own record.
"""

from __future__ import annotations

import _ast
import builtins
import os
import sys

# Not typing.TYPE_CHECKING: importing typing would load (and pin) a dozen modules.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import CodeType, TracebackType
    from typing import Any

CO_COROUTINE = 0x0080
#: Opens the report line (the record separator control character keeps it out of the way).
REPORT_MARK = "\x1epyexec-eval-report "


def main(config: dict[str, Any]) -> None:
    """Run the user's entrypoint as described in the module docstring; never returns normally
    on failure (``SystemExit``)."""
    wrapper = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(wrapper))
    path = os.path.join(root, *config["entrypoint"].split("/"))
    report: dict[str, Any] = {"result": None, "error_type": None, "error_line": None}
    final_line = None
    try:
        with open(path, "rb") as fh:
            source = fh.read()
        body, last = _compile(source, path, bool(config.get("eval_last_expr")))
        is_async = bool((body.co_flags | (last.co_flags if last else 0)) & CO_COROUTINE)
        if is_async:
            import asyncio  # noqa: F401 - now, before the user's directory is on sys.path
        namespace = _enter_main(path, wrapper, config["entrypoint"])
        value = _run(body, last, namespace, is_async)
        if last is not None and value is not None:
            final_line = last.co_firstlineno
            report["result"] = _bounded_repr(value, int(config.get("result_limit") or 0))
    except SystemExit:
        # An intentional exit (sys.exit, exit()) is the program's own verdict, not an error.
        _report(report)
        raise
    except BaseException as exc:  # noqa: BLE001 - reported like Python would, then exit 1
        report["error_type"] = type(exc).__name__
        report["error_line"] = _error_line(exc, path, final_line)
        _show(exc, path)
        _report(report)
        raise SystemExit(1) from None
    _report(report)


def _compile(source: bytes, path: str, split_last: bool) -> tuple[CodeType, CodeType | None]:
    """The module's code and, if asked and present, its final expression's code."""
    flags = _ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    tree = compile(source, path, "exec", _ast.PyCF_ONLY_AST | flags, dont_inherit=True)
    last = None
    if split_last and tree.body and isinstance(tree.body[-1], _ast.Expr):
        final = tree.body.pop()
        last = compile(_ast.Expression(body=final.value), path, "eval", flags, dont_inherit=True)
    return compile(tree, path, "exec", flags, dont_inherit=True), last


def _enter_main(path: str, wrapper: str, entrypoint: str) -> dict[str, Any]:
    """A fresh ``__main__`` module for ``path``, installed as ``python3 <path>`` would."""
    module = type(sys)("__main__")
    namespace: dict[str, Any] = module.__dict__
    loader_type = getattr(sys.modules.get("_frozen_importlib_external"), "SourceFileLoader", None)
    namespace.update(
        __file__=path,
        __builtins__=builtins,
        __cached__=None,
        __loader__=None if loader_type is None else loader_type("__main__", path),
        __package__=None,
        __spec__=None,
    )
    sys.modules["__main__"] = module
    sys.argv[0] = entrypoint if os.path.abspath(entrypoint) == path else path
    # Without -P/-I, sys.path[0] is this file's directory; the user's program expects its own.
    if sys.path and sys.path[0] == os.path.dirname(wrapper):
        sys.path[0] = os.path.dirname(path)
    return namespace


def _run(body: CodeType, last: CodeType | None, namespace: dict[str, Any], is_async: bool) -> Any:
    if not is_async:
        exec(body, namespace)  # noqa: S102 - running the user's program is the point
        return None if last is None else eval(last, namespace)  # noqa: S307

    import asyncio

    async def both() -> Any:
        # One event loop for the module and its final expression, so objects bound to the
        # loop (tasks, queues, locks) made by the first still work in the second.
        value = eval(body, namespace)  # noqa: S307
        if body.co_flags & CO_COROUTINE:
            await value
        if last is None:
            return None
        value = eval(last, namespace)  # noqa: S307
        if last.co_flags & CO_COROUTINE:
            value = await value
        return value

    return asyncio.run(both())


def _bounded_repr(value: Any, limit: int) -> str:
    text = repr(value)
    if limit and len(text) > limit:
        return f"{text[:limit]}... [{len(text) - limit} more characters]"
    return text


def _user_frames(tb: TracebackType | None, path: str) -> TracebackType | None:
    """The traceback from the first frame of the user's entrypoint on (wrapper frames cut)."""
    while tb is not None and tb.tb_frame.f_code.co_filename != path:
        tb = tb.tb_next
    return tb


def _error_line(exc: BaseException, path: str, fallback: int | None) -> int | None:
    """Where it failed in the user's entrypoint: the innermost frame there (the raise site
    for an error inside one of its functions); for a syntax error, its own line."""
    if isinstance(exc, SyntaxError) and exc.filename == path and exc.lineno:
        return exc.lineno
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path and tb.tb_lineno is not None:
            line = tb.tb_lineno
        tb = tb.tb_next
    return fallback if line is None else line


def _show(exc: BaseException, path: str) -> None:
    """Print the traceback as Python would for the user's script, through sys.excepthook."""
    _flush()
    tb = _user_frames(exc.__traceback__, path)
    # The display reads the exception's own __traceback__, so trim it there too.
    exc.__traceback__ = tb
    try:
        sys.excepthook(type(exc), exc, tb)
    except BaseException:  # noqa: BLE001 - a broken hook must not hide the user's error
        sys.__excepthook__(type(exc), exc, tb)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # noqa: BLE001, S110 - a closed or replaced stream has nothing to flush
            pass


def _report(report: dict[str, Any]) -> None:
    """Write the report line to fd 2 (below any replaced sys.stderr)."""
    _flush()
    # repr of a dict of str/int/None is a Python literal; the service reads it with
    # ast.literal_eval. (Importing json here could pick up the user's own json.py.)
    data = f"\n{REPORT_MARK}{report!r}\n".encode("utf-8", "backslashreplace")
    try:
        while data:
            data = data[os.write(2, data) :]
    except OSError:
        pass  # fd 2 is gone: the service falls back to reading the traceback text
