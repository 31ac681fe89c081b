"""The blocking client is generated from the asyncio one and cannot drift from it."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from pyexec.client import AsyncClient, Client

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "unasync.py"


def load_unasync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("unasync", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sync_client_is_the_generated_twin() -> None:
    """_sync.py is exactly what scripts/unasync.py makes of _async.py."""
    unasync = load_unasync()
    expected = unasync.generate(unasync.SOURCE.read_text(encoding="utf-8"))
    assert unasync.TARGET.read_text(encoding="utf-8") == expected, (
        "pyexec/client/_sync.py drifted from _async.py: run python scripts/unasync.py"
    )


def test_check_mode_exits_0_on_the_committed_twins() -> None:
    """`scripts/unasync.py --check` (what a developer or CI runs) passes on the tree."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_a_construct_without_a_rule_is_refused() -> None:
    """An async construct the substitutions do not cover fails generation instead of leaking."""
    unasync = load_unasync()
    with pytest.raises(ValueError, match="async"):
        unasync.generate("await asyncio.gather(a, b)\n")


def test_the_twins_offer_the_same_methods() -> None:
    """Every public method of one client exists on the other, with the same parameters."""

    def public(cls: type) -> dict[str, list[str]]:
        names = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}
        return {
            names.get(name, name): list(inspect.signature(member).parameters)
            for name, member in inspect.getmembers(cls, inspect.isfunction)
            if not name.startswith("_") or name in names or name in names.values()
        }

    assert public(AsyncClient) == public(Client)
