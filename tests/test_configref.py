"""The configuration reference is generated from the settings class and cannot drift."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest

from pyexec.configref import config_reference, format_default, render, sections
from pyexec.settings import ResourceClass, Settings, env_names

COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_committed_reference_matches_settings() -> None:
    """docs/configuration.md is exactly what the settings class generates today."""
    assert COMMITTED.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is stale: run "
        "`uv run pyexec config-reference --output docs/configuration.md`"
    )


def test_every_setting_appears_once_with_its_env_names() -> None:
    """Each field is listed in exactly one section, under all of its variables."""
    listed = [field.name for _, fields in sections() for field in fields]
    assert sorted(listed) == sorted(field.name for field in attrs.fields(Settings))
    text = render()
    for field in attrs.fields(Settings):
        names = ", ".join(f"`{name}`" for name in env_names(field))
        assert f"| {names} |" in text


def test_sections_follow_the_source_comments() -> None:
    """Section headings come from the `# --- Title ---` comments of the class body."""
    titles = [title for title, _ in sections()]
    assert titles[0] == "HTTP service"
    assert "Nomad runner" in titles
    assert "General" not in titles
    assert "Other" not in titles


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "*(unset)*"),
        ((), "*(empty)*"),
        (True, "`true`"),
        (8080, "`8080`"),
        (("a", "b"), "`a,b`"),
        ((("3.12", "python:3.12-slim"),), "`3.12=python:3.12-slim`"),
        ((ResourceClass("small", 500, 512, 1024),), "`small:500:512:1024`"),
    ],
)
def test_defaults_are_spelled_as_the_environment_would(value: object, shown: str) -> None:
    """A default is written in the syntax its variable accepts."""
    assert format_default(value) == shown


def test_rendered_defaults_parse_back_to_the_defaults() -> None:
    """Feeding each documented default back through its parser gives the field's default."""
    for field in attrs.fields(Settings):
        shown = format_default(field.default)
        if shown.startswith("`"):
            raw = shown.strip("`")
            assert field.metadata["parse"](raw) == field.default, field.name


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    """--check exits 1 on a stale file and 0 once the file has been written."""
    target = tmp_path / "configuration.md"
    target.write_text("old\n", encoding="utf-8")
    assert config_reference(target, check=True) == 1
    assert config_reference(target) == 0
    assert config_reference(target, check=True) == 0


def test_cli_command_checks_the_committed_file() -> None:
    """`pyexec config-reference --output docs/configuration.md --check` passes on the tree."""
    from pyexec.cli import run_cli

    assert run_cli(["config-reference", "--output", str(COMMITTED), "--check"]) == 0
