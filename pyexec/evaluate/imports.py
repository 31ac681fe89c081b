"""Which third-party modules a program imports, found with the AST.

An import counts when it names an absolute module that is neither in the
standard library of the *target* Python version (``stdlib_names``) nor one of
the program's own modules. Imports inside functions and classes count: they
run on the first call. Two kinds are left out on purpose, because installing
them could only hurt:

- imports guarded by ``try: ... except ImportError`` (or ``ModuleNotFoundError``):
  the program has a fallback, and a failing install of an optional extra would
  fail the whole run. A broader handler (``except Exception``) is no such sign:
  agents wrap whole programs in it;
- imports under ``if TYPE_CHECKING:``: they never run.

Code the host's parser cannot read (newer syntax than the service's Python, or
a plain syntax error) falls back to a line scan for ``import``/``from``
statements, which is good enough for installing and leaves the real verdict to
the interpreter in the sandbox.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping

from .stdlib_names import STDLIB_MODULES

__all__ = ["imported_modules", "local_modules", "stdlib_for", "third_party_imports"]

_GUARDS = frozenset({"ImportError", "ModuleNotFoundError"})

# ``import a.b as c, d`` and ``from a.b import c`` at the start of a logical line.
_IMPORT_LINE = re.compile(
    r"^\s*import\s+(?P<names>[\w.]+(?:\s+as\s+\w+)?(?:\s*,\s*[\w.]+(?:\s+as\s+\w+)?)*)"
)
_FROM_LINE = re.compile(r"^\s*from\s+(?P<module>\.*[\w.]*)\s+import\b")


def stdlib_for(version: str) -> frozenset[str]:
    """The standard-library module names of ``version`` (the nearest known older table
    for a version newer than the generated ones)."""
    if version in STDLIB_MODULES:
        return STDLIB_MODULES[version]

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    known = sorted(STDLIB_MODULES, key=key)
    older = [v for v in known if key(v) <= key(version)]
    return STDLIB_MODULES[older[-1] if older else known[0]]


class _Collector(ast.NodeVisitor):
    def __init__(self) -> None:
        self.modules: set[str] = set()

    def visit_Import(self, node: ast.Import) -> None:
        self.modules.update(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self.modules.add(node.module)
            # ``from google import protobuf`` imports google.protobuf when it is a module.
            self.modules.update(f"{node.module}.{alias.name}" for alias in node.names)

    def visit_Try(self, node: ast.Try | ast.TryStar) -> None:
        if any(_catches_import_error(handler) for handler in node.handlers):
            # The guarded body is optional; handlers, else and finally still run as usual.
            for part in (node.handlers, node.orelse, node.finalbody):
                for child in part:
                    self.visit(child)
            return
        self.generic_visit(node)

    def visit_TryStar(self, node: ast.TryStar) -> None:
        self.visit_Try(node)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return False
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(_name(t) in _GUARDS for t in types)


def _is_type_checking(test: ast.expr) -> bool:
    return _name(test) == "TYPE_CHECKING"


def _name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _scan_lines(source: str) -> set[str]:
    modules: set[str] = set()
    for line in source.splitlines():
        if match := _IMPORT_LINE.match(line):
            for item in match["names"].split(","):
                modules.add(item.split()[0])
        elif (match := _FROM_LINE.match(line)) and not match["module"].startswith("."):
            modules.add(match["module"])
    return modules


def imported_modules(source: str) -> set[str]:
    """Absolute module names ``source`` imports, dotted as written (relative ones left out)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return _scan_lines(source)
    collector = _Collector()
    collector.visit(tree)
    return collector.modules


def local_modules(names: Iterable[str], entrypoint: str) -> frozenset[str]:
    """Top-level module names the program's own files provide.

    A file ``util.py`` or a directory ``pkg/`` counts at the archive root and in the
    entrypoint's directory (which is ``sys.path[0]`` when it runs).
    """
    entry_dir = entrypoint.rpartition("/")[0]
    bases = {"", f"{entry_dir}/"} if entry_dir else {""}
    local = set()
    for name in names:
        for base in bases:
            if not name.startswith(base):
                continue
            first, sep, _ = name[len(base) :].partition("/")
            if sep:
                local.add(first)
            elif first.endswith(".py"):
                local.add(first[:-3])
    return frozenset(local)


def third_party_imports(
    files: Mapping[str, str], entrypoint: str, python_version: str
) -> tuple[str, ...]:
    """Sorted dotted module names the ``.py`` files import from outside the standard library
    of ``python_version`` and outside the program itself."""
    stdlib = stdlib_for(python_version)
    local = local_modules(files, entrypoint)
    found: set[str] = set()
    for name, source in files.items():
        if name.endswith(".py"):
            found.update(imported_modules(source))
    return tuple(sorted(m for m in found if _third_party(m, stdlib, local)))


def _third_party(module: str, stdlib: frozenset[str], local: frozenset[str]) -> bool:
    top = module.partition(".")[0]
    # Only ASCII identifiers can name a distribution (and never start a pip option).
    if not (top.isascii() and top.isidentifier()) or top.startswith("_"):
        return False
    return top not in stdlib and top not in local
