"""The eval JSON body: what is accepted, what is refused with which code."""

from __future__ import annotations

import io
import tarfile
from typing import Any

import attrs
import pytest

from pyexec.errors import BadRequest, LimitExceeded, PayloadTooLarge
from pyexec.evaluate import parse_eval_request, prepare
from pyexec.evaluate.archive import WRAPPER_PATH
from pyexec.settings import Settings

SETTINGS = Settings(
    python_images=(("3.11", "img:3.11"), ("3.12", "img:3.12")),
    default_python_version="3.12",
    max_eval_code_bytes=1000,
    setup_network=True,  # auto-install is on only where setup has the network
)


def refused(body: Any, settings: Settings = SETTINGS) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_eval_request(body, settings)
    return info.value


def test_code_becomes_main_py_with_the_default_image() -> None:
    """`code` alone runs as main.py on the default version's image."""
    request = parse_eval_request({"code": "print(1)"}, SETTINGS)
    assert request.files == (("main.py", "print(1)"),)
    assert request.entrypoint == "main.py"
    assert request.python_version == "3.12"
    assert request.execution.docker_image == "img:3.12"
    assert request.eval_last_expr is False
    assert request.auto_requirements is True


def test_python_version_picks_its_image() -> None:
    """python_version selects the image configured for it."""
    request = parse_eval_request({"code": "", "python_version": "3.11"}, SETTINGS)
    assert request.execution.docker_image == "img:3.11"


def test_unsupported_python_version_lists_the_supported_ones() -> None:
    """An unknown version is a 400 naming every supported version."""
    error = refused({"code": "", "python_version": "3.9"})
    assert error.code == "unsupported_python_version"
    assert "3.11, 3.12" in error.message
    assert error.details["supported"] == ["3.11", "3.12"]


def test_python_version_must_be_a_string() -> None:
    """A JSON number (3.10 reads as 3.1) is refused rather than guessed at."""
    assert refused({"code": "", "python_version": 3.11}).code == "invalid_field"


def test_code_and_files_together_are_refused() -> None:
    """Both code and files → 400 code_and_files."""
    body = {"code": "x", "files": [{"name": "main.py", "content": "x"}]}
    assert refused(body).code == "code_and_files"


def test_neither_code_nor_files_is_refused() -> None:
    """Neither code nor files → 400 missing_code."""
    assert refused({"stdin": "x"}).code == "missing_code"


def test_unknown_field_is_refused() -> None:
    """An unknown top-level or file field → 400 unknown_field."""
    assert refused({"code": "", "docker_image": "evil"}).code == "unknown_field"
    error = refused({"files": [{"name": "main.py", "content": "", "mode": 7}]})
    assert (error.code, error.details["field"]) == ("unknown_field", "files[0].mode")


def test_code_size_limit_is_a_413() -> None:
    """More code than max_eval_code_bytes (UTF-8 bytes) → 413 code_too_large."""
    with pytest.raises(PayloadTooLarge) as info:
        parse_eval_request({"code": "é" * 501}, SETTINGS)
    assert (info.value.status_code, info.value.code) == (413, "code_too_large")
    parse_eval_request({"code": "é" * 500}, SETTINGS)


def test_size_limit_counts_all_files() -> None:
    """The limit is on the total of all files."""
    files = [{"name": f"m{i}.py", "content": "x" * 300} for i in range(4)]
    files.append({"name": "main.py", "content": ""})
    with pytest.raises(PayloadTooLarge):
        parse_eval_request({"files": files}, SETTINGS)


def test_files_need_the_entrypoint() -> None:
    """files without the entrypoint among them → 400 entrypoint_not_found."""
    body = {"files": [{"name": "app.py", "content": ""}]}
    assert refused(body).code == "entrypoint_not_found"
    ok = parse_eval_request({**body, "entrypoint": "app.py"}, SETTINGS)
    assert ok.entrypoint == "app.py"


def test_code_with_an_entrypoint_is_named_after_it() -> None:
    """`code` plus `entrypoint` stores the code under that name."""
    request = parse_eval_request({"code": "1", "entrypoint": "tool/run.py"}, SETTINGS)
    assert request.files == (("tool/run.py", "1"),)


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("/etc/passwd", "invalid_file_name"),
        ("../x.py", "invalid_file_name"),
        ("a//b.py", "invalid_file_name"),
        ("a\\b.py", "invalid_file_name"),
        (".pyexec/eval.py", "reserved_name"),
    ],
)
def test_bad_file_names(name: str, code: str) -> None:
    """File names must be relative paths outside eval's reserved directory."""
    body = {"files": [{"name": "main.py", "content": ""}, {"name": name, "content": ""}]}
    assert refused(body).code == code


def test_duplicate_and_file_directory_clashes() -> None:
    """The same name twice, or a file that is also a directory, is refused."""
    twice = [{"name": "main.py", "content": ""}, {"name": "main.py", "content": ""}]
    assert refused({"files": twice}).code == "duplicate_file"
    clash = [{"name": "main.py", "content": ""}, {"name": "main.py/x.py", "content": ""}]
    assert refused({"files": clash}).code == "invalid_file_name"


def test_lone_surrogates_are_refused() -> None:
    """Code that cannot be UTF-8 (a lone surrogate from JSON) is a 400, not a crash."""
    assert refused({"code": "x = '\ud800'"}).code == "invalid_field"


def test_shared_fields_follow_the_tar_api_rules() -> None:
    """env_vars, config and entrypoint are checked exactly as for the tar API."""
    assert refused({"code": "", "env_vars": ["NOEQUALS"]}).code == "invalid_field"
    assert refused({"code": "", "config": {"nope": 1}}).code == "unknown_field"
    with pytest.raises(LimitExceeded):
        parse_eval_request({"code": "", "config": {"timeout_seconds": 10**6}}, SETTINGS)
    request = parse_eval_request(
        {"code": "", "env_vars": ["A=1"], "script_args": ["-v"], "config": {"memory_mb": 128}},
        SETTINGS,
    )
    assert request.execution.env_vars == (("A", "1"),)
    assert request.execution.script_args == ("-v",)
    assert request.execution.config.memory_mb == 128


def test_flags_must_be_booleans() -> None:
    """eval_last_expr and auto_requirements take true/false only."""
    assert refused({"code": "", "eval_last_expr": 1}).code == "invalid_field"
    assert refused({"code": "", "auto_requirements": "yes"}).code == "invalid_field"


def test_nulls_mean_defaults() -> None:
    """A JSON null for an optional field is the same as leaving it out."""
    request = parse_eval_request(
        {"code": "", "files": None, "python_version": None, "auto_requirements": None}, SETTINGS
    )
    assert request.python_version == "3.12"
    assert request.auto_requirements is True


# --- prepare: what goes to the service ---------------------------------------------------------


def test_prepared_job_runs_the_wrapper_with_merged_requirements() -> None:
    """The service gets the wrapper as entrypoint, the user's files, and merged requirements."""
    request = parse_eval_request(
        {
            "files": [
                {"name": "main.py", "content": "import yaml, requests, helper\n"},
                {"name": "helper.py", "content": "import bs4\n"},
            ],
            "requirements_txt": "requests==2.32.3",
        },
        SETTINGS,
    )
    job = prepare(request, SETTINGS)
    assert job.request.entrypoint == WRAPPER_PATH
    assert job.request.requirements_txt == "requests==2.32.3\nbeautifulsoup4\nPyYAML\n"
    assert job.initial == {"auto_requirements": ("beautifulsoup4", "PyYAML")}
    with tarfile.open(fileobj=io.BytesIO(job.tar.getvalue())) as tar:
        names = tar.getnames()
        wrapper = tar.extractfile(WRAPPER_PATH).read().decode()  # type: ignore[union-attr]
    assert sorted(names) == sorted([".pyexec", WRAPPER_PATH, "main.py", "helper.py"])
    assert "'entrypoint': 'main.py'" in wrapper.splitlines()[-1]


def test_auto_requirements_off_reports_nothing() -> None:
    """auto_requirements false: nothing is added and the field stays absent."""
    request = parse_eval_request({"code": "import yaml", "auto_requirements": False}, SETTINGS)
    job = prepare(request, SETTINGS)
    assert job.request.requirements_txt == ""
    assert job.initial == {}


def test_auto_requirements_off_when_setup_has_no_network() -> None:
    """Without network in the setup phase, detection is skipped (an install could only fail)."""
    settings = attrs.evolve(SETTINGS, setup_network=False)
    job = prepare(parse_eval_request({"code": "import yaml"}, settings), settings)
    assert (job.request.requirements_txt, job.initial) == ("", {})


def test_asking_for_auto_requirements_without_setup_network_is_refused() -> None:
    """An explicit auto_requirements: true where setup has no network is 400
    setup_network_unavailable, never silently skipped; false is fine."""
    settings = attrs.evolve(SETTINGS, setup_network=False)
    with pytest.raises(BadRequest) as info:
        parse_eval_request({"code": "import yaml", "auto_requirements": True}, settings)
    assert (info.value.status_code, info.value.code) == (400, "setup_network_unavailable")
    assert parse_eval_request({"code": "", "auto_requirements": False}, settings)
    assert parse_eval_request({"code": ""}, settings).auto_requirements is False


def test_server_default_can_turn_auto_requirements_off() -> None:
    """settings.eval_auto_requirements=False is the default a request can override."""
    settings = attrs.evolve(SETTINGS, eval_auto_requirements=False)
    assert parse_eval_request({"code": ""}, settings).auto_requirements is False
    request = parse_eval_request({"code": "", "auto_requirements": True}, settings)
    assert request.auto_requirements is True


def test_stdlib_only_code_reports_an_empty_list() -> None:
    """With auto-install on and nothing to install, auto_requirements is []."""
    job = prepare(parse_eval_request({"code": "import json"}, SETTINGS), SETTINGS)
    assert job.initial == {"auto_requirements": ()}
    assert job.request.requirements_txt == ""
