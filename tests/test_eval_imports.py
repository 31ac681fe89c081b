"""Import detection, the per-version standard-library tables, and import → distribution."""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

from pyexec.evaluate import gen_stdlib
from pyexec.evaluate.distributions import (
    distribution_for,
    distributions_for,
    merge_requirements,
    requirement_names,
)
from pyexec.evaluate.imports import (
    imported_modules,
    local_modules,
    stdlib_for,
    third_party_imports,
)
from pyexec.evaluate.stdlib_names import STDLIB_MODULES


def detect(source: str, version: str = "3.12", **others: str) -> tuple[str, ...]:
    files = {"main.py": textwrap.dedent(source), **others}
    return third_party_imports(files, "main.py", version)


# --- the standard-library tables -------------------------------------------------------


def test_tables_cover_every_supported_version() -> None:
    """There is a generated table for each of 3.10 to 3.13."""
    assert set(STDLIB_MODULES) == {"3.10", "3.11", "3.12", "3.13"}


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="compares with a 3.11 interpreter")
def test_table_matches_the_running_interpreter() -> None:
    """The 3.11 table is exactly what a 3.11 interpreter reports."""
    assert STDLIB_MODULES["3.11"] == sys.stdlib_module_names


def test_tables_differ_where_the_standard_library_changed() -> None:
    """tomllib arrives in 3.11, asyncore leaves in 3.12, cgi leaves in 3.13."""
    assert "tomllib" not in STDLIB_MODULES["3.10"]
    assert "tomllib" in STDLIB_MODULES["3.11"]
    assert "asyncore" in STDLIB_MODULES["3.11"]
    assert "asyncore" not in STDLIB_MODULES["3.12"]
    assert "cgi" in STDLIB_MODULES["3.12"]
    assert "cgi" not in STDLIB_MODULES["3.13"]


def test_unknown_newer_version_uses_the_newest_older_table() -> None:
    """A configured 3.14 is checked against the 3.13 table, 3.9 against the oldest."""
    assert stdlib_for("3.14") is STDLIB_MODULES["3.13"]
    assert stdlib_for("3.9") is STDLIB_MODULES["3.10"]


def test_generator_renders_a_module_that_round_trips() -> None:
    """The generator's output, executed, gives back the tables it was given."""
    tables = {"3.11": ["os", "sys", "tomllib"], "3.10": ["os", "sys"]}
    namespace: dict[str, object] = {}
    exec(gen_stdlib.generate(tables), namespace)  # noqa: S102 - our own generated code
    assert namespace["STDLIB_MODULES"] == {k: frozenset(v) for k, v in tables.items()}


PYENV = "/root/.pyenv/versions"


@pytest.mark.skipif(not os.path.isdir(PYENV), reason="needs the pyenv interpreters 3.10-3.13")
def test_committed_tables_match_the_real_interpreters() -> None:
    """Regenerating from real 3.10-3.13 interpreters reproduces stdlib_names.py."""
    interpreters = sorted(
        f"{PYENV}/{name}/bin/python3"
        for name in os.listdir(PYENV)
        if name.split(".")[:2] in (["3", "10"], ["3", "11"], ["3", "12"], ["3", "13"])
    )
    tables = dict(gen_stdlib.query(path) for path in interpreters)
    if set(tables) != set(STDLIB_MODULES):
        pytest.skip(f"only {sorted(tables)} are installed")
    assert gen_stdlib.generate(tables) == gen_stdlib.TARGET.read_text(encoding="utf-8")


# --- detection ----------------------------------------------------------------------------


def test_stdlib_only_program_needs_nothing() -> None:
    """A program using only the standard library detects no third-party import."""
    source = """
        import os, sys, json
        from collections import defaultdict
        from concurrent.futures import ThreadPoolExecutor
        import xml.etree.ElementTree as ET
        import __future__
        print(os.getcwd(), sys.argv, json.dumps({}), defaultdict, ThreadPoolExecutor, ET)
    """
    assert detect(source) == ()


def test_aliased_and_dotted_imports() -> None:
    """Aliases and dotted names are found by the module they import."""
    source = """
        import numpy as np
        import matplotlib.pyplot as plt
        from sklearn.linear_model import LinearRegression
        import cv2, yaml as y
    """
    found = detect(source)
    assert {"numpy", "matplotlib.pyplot", "sklearn.linear_model", "cv2", "yaml"} <= set(found)
    assert distributions_for(found) == (
        "matplotlib",
        "numpy",
        "opencv-python",
        "PyYAML",
        "scikit-learn",
    )


def test_from_package_import_submodule() -> None:
    """`from a.b import c` names a.b (and a.b.c, in case c is a module)."""
    assert imported_modules("from google.protobuf import json_format\n") == {
        "google.protobuf",
        "google.protobuf.json_format",
    }
    assert distributions_for(detect("from google import protobuf\n")) == ("protobuf",)


def test_relative_imports_are_ignored() -> None:
    """`from . import x` and `from .pkg import y` are the program's own."""
    source = """
        from . import helpers
        from .models import User
        from ..shared import config
        import requests
    """
    assert detect(source) == ("requests",)


def test_imports_inside_functions_and_classes_count() -> None:
    """An import in a function body is installed too: it runs on the first call."""
    source = """
        def fetch(url):
            import httpx
            return httpx.get(url)

        class Frame:
            def load(self):
                from pandas import read_csv
                return read_csv
    """
    assert distributions_for(detect(source)) == ("httpx", "pandas")


def test_local_modules_shadow_distributions() -> None:
    """A file or package of the program named like a distribution is not installed."""
    source = """
        import requests
        import utils
        from yaml import safe_load
        import mypkg.sub
    """
    found = detect(
        source,
        **{"requests.py": "x = 1\n", "yaml/__init__.py": "", "mypkg/sub.py": "", "utils.py": ""},
    )
    assert found == ()


def test_local_modules_next_to_a_nested_entrypoint() -> None:
    """Modules beside src/main.py are importable as top-level names (sys.path[0])."""
    assert local_modules(["src/main.py", "src/helpers.py", "src/lib/x.py"], "src/main.py") == {
        "src",
        "main",
        "helpers",
        "lib",
    }


def test_imports_in_other_files_count() -> None:
    """Every .py file of a project is scanned, not only the entrypoint."""
    found = detect("import helpers\n", **{"helpers.py": "import bs4\n", "notes.txt": "import x"})
    assert found == ("bs4",)


def test_guarded_optional_imports_are_not_installed() -> None:
    """try/except ImportError marks an optional import; except Exception does not."""
    source = """
        try:
            import ujson as json
        except ImportError:
            import json
        try:
            import orjson
        except (ModuleNotFoundError, OSError):
            orjson = None
        try:
            import requests
            requests.get("http://example.invalid")
        except Exception as exc:
            print(exc)
    """
    assert detect(source) == ("requests",)


def test_type_checking_imports_are_not_installed() -> None:
    """Imports under `if TYPE_CHECKING:` never run, so they are not installed."""
    source = """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            import pandas
        else:
            import attr
    """
    assert detect(source) == ("attr",)


def test_stdlib_of_the_target_version_decides() -> None:
    """tomllib is standard on 3.11 but not on 3.10; asyncore the other way round on 3.12."""
    assert detect("import tomllib\n", "3.11") == ()
    assert detect("import tomllib\n", "3.10") == ("tomllib",)
    assert distributions_for(detect("import tomllib\n", "3.10")) == ()
    assert detect("import asyncore\n", "3.11") == ()
    assert distributions_for(detect("import asyncore\n", "3.12")) == ("pyasyncore",)


def test_unparseable_code_falls_back_to_a_line_scan() -> None:
    """Code the host cannot parse still has its imports found line by line."""
    source = (
        "import numpy as np, requests\nfrom rich.console import Console\nfrom . import x\ndef (:\n"
    )
    assert detect(source) == ("numpy", "requests", "rich.console")


def test_private_and_non_ascii_modules_are_never_installed() -> None:
    """A name starting with an underscore, or not ASCII, is no distribution."""
    assert detect("import _private_thing\nimport données\n") == ()


# --- import → distribution --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "distribution"),
    [
        ("cv2", "opencv-python"),
        ("sklearn.model_selection", "scikit-learn"),
        ("PIL.Image", "Pillow"),
        ("yaml", "PyYAML"),
        ("bs4", "beautifulsoup4"),
        ("dateutil.parser", "python-dateutil"),
        ("jwt", "PyJWT"),
        ("Crypto.Cipher", "pycryptodome"),
        ("google.protobuf.message", "protobuf"),
        ("attr", "attrs"),
        ("dotenv", "python-dotenv"),
        ("requests", "requests"),
        ("google", None),
        ("imp", None),
    ],
)
def test_distribution_names(module: str, distribution: str | None) -> None:
    """Import names map to the distribution that provides them (None: never installed)."""
    assert distribution_for(module) == distribution


def test_requirement_names_reads_the_usual_line_forms() -> None:
    """Pins, extras, markers, URLs with #egg= and comments all yield the distribution name."""
    text = """
        # comment
        Requests==2.32.0
        pyyaml>=6 ; python_version > "3.8"
        uvicorn[standard]
        -r other.txt
        --index-url https://example.invalid/simple
        git+https://example.invalid/x.git#egg=My_Pkg
        rich @ https://example.invalid/rich.whl
    """
    assert requirement_names(textwrap.dedent(text)) == {
        "requests",
        "pyyaml",
        "uvicorn",
        "my-pkg",
        "rich",
    }


def test_explicit_requirements_win() -> None:
    """A distribution named in requirements_txt (any spelling, any pin) is not added again."""
    merged, added = merge_requirements("pyyaml==6.0.1\n", ("PyYAML", "requests"))
    assert added == ("requests",)
    assert merged == "pyyaml==6.0.1\nrequests\n"


def test_an_alternative_distribution_counts_as_explicit() -> None:
    """opencv-python-headless in requirements_txt satisfies `import cv2`."""
    merged, added = merge_requirements("opencv-python-headless\n", ("opencv-python",))
    assert (merged, added) == ("opencv-python-headless\n", ())


def test_merge_without_explicit_requirements() -> None:
    """With no requirements_txt the detected distributions are the whole file."""
    assert merge_requirements("", ("numpy", "six")) == ("numpy\nsix\n", ("numpy", "six"))
    assert merge_requirements("", ()) == ("", ())
