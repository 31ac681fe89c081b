"""`pyexec job render|register` and `pyexec bundle upload` (settings from the environment)."""

from __future__ import annotations

import json

import pytest

from pyexec.cli import run_cli
from pyexec.runner import nomad_job
from pyexec.settings import Settings

ENV = ("NOMAD_ADDR", "PYEXEC_NOMAD_ADDR", "CONSUL_HTTP_ADDR", "PYEXEC_CONSUL_ADDR")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_render_one_class_prints_the_job_as_api_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`job render --class small` prints {"Job": ...} exactly as the function builds it."""
    assert run_cli(["job", "render", "--class", "small"]) == 0
    printed = json.loads(capsys.readouterr().out)
    settings = Settings()
    assert printed == {"Job": nomad_job.runner_job(settings, settings.nomad_resource_classes[0])}


@pytest.mark.parametrize(("pool_size", "pool_jobs"), [("0", []), ("2", ["a-pool", "b-pool"])])
def test_render_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    pool_size: str,
    pool_jobs: list[str],
) -> None:
    """`job render` prints the jobs of each class (and its -pip variant) from the settings,
    then each class's warm-pool job when images are pooled."""
    monkeypatch.setenv("PYEXEC_NOMAD_RESOURCE_CLASSES", "a:100:128:64,b:200:256:128")
    monkeypatch.setenv("PYEXEC_NOMAD_JOB_PREFIX", "sandbox")
    monkeypatch.setenv("PYEXEC_POOL_SIZE", pool_size)
    assert run_cli(["job", "render"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    runner = ["a", "a-pip", "b", "b-pip"]
    assert [j["Job"]["ID"] for j in jobs] == [f"sandbox-{name}" for name in runner + pool_jobs]


def test_render_unknown_class_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown class exits 2 and names the classes there are."""
    assert run_cli(["job", "render", "--class", "huge"]) == 2
    assert "classes: small, medium, large" in capsys.readouterr().err


def test_register_needs_nomad_addr(capsys: pytest.CaptureFixture[str]) -> None:
    """`job register` without NOMAD_ADDR exits 2 with a hint."""
    assert run_cli(["job", "register"]) == 2
    assert "NOMAD_ADDR" in capsys.readouterr().err


def test_bundle_upload_needs_consul(capsys: pytest.CaptureFixture[str]) -> None:
    """`bundle upload` without CONSUL_HTTP_ADDR exits 2 with a hint."""
    assert run_cli(["bundle", "upload", "main.py"]) == 2
    assert "CONSUL_HTTP_ADDR" in capsys.readouterr().err


def test_bundle_upload_rejects_bad_metadata(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Metadata that is not JSON, or has unknown fields, is refused before Consul is used."""
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
    assert run_cli(["bundle", "upload", __file__, "--metadata", "{nope"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert run_cli(["bundle", "upload", __file__, "--metadata", '{"colour": 1}']) == 2
    assert "unknown field" in capsys.readouterr().err
