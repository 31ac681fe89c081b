"""Settings are checked at start-up: a bad value stops ``pyexec serve`` naming its variable."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from pyexec.api import server
from pyexec.cli import exitcodes, run_cli
from pyexec.settings import Settings, SettingsError

ANY = "0.0.0.0"  # noqa: S104  # the address these tests are about; nothing binds it

#: (environment, the variable the one-line error must name)
INVALID = [
    ({"PYEXEC_DEFAULT_TIMEOUT": "5000", "PYEXEC_MAX_TIMEOUT": "3600"}, "PYEXEC_DEFAULT_TIMEOUT"),
    ({"PYEXEC_DEFAULT_TIMEOUT": "0"}, "PYEXEC_DEFAULT_TIMEOUT"),
    ({"PYEXEC_DEFAULT_MEMORY_MB": "9000"}, "PYEXEC_DEFAULT_MEMORY_MB"),
    ({"PYEXEC_MAX_DISK_MB": "10"}, "PYEXEC_DEFAULT_DISK_MB"),
    ({"PYEXEC_DEFAULT_CPU_SHARES": "1"}, "PYEXEC_DEFAULT_CPU_SHARES"),
    ({"PYEXEC_MAX_PIDS_LIMIT": "100"}, "PYEXEC_DEFAULT_PIDS_LIMIT"),
    ({"PYEXEC_MAX_OUTPUT_BYTES": "1000"}, "PYEXEC_DEFAULT_MAX_OUTPUT_BYTES"),
    ({"PYEXEC_PORT": "-5"}, "PYEXEC_PORT"),
    ({"PYEXEC_PORT": "70000"}, "PYEXEC_PORT"),
    ({"PYEXEC_PORT": "http"}, "PYEXEC_PORT"),
    ({"PYEXEC_LOG_FORMAT": "yaml"}, "PYEXEC_LOG_FORMAT"),
    ({"PYEXEC_LOG_LEVEL": "chatty"}, "PYEXEC_LOG_LEVEL"),
    ({"PYEXEC_HOST": " "}, "PYEXEC_HOST"),
    ({"PYEXEC_MAX_IN_FLIGHT": "-1"}, "PYEXEC_MAX_IN_FLIGHT"),
    ({"PYEXEC_SHUTDOWN_GRACE_SECONDS": "nan"}, "PYEXEC_SHUTDOWN_GRACE_SECONDS"),
    ({"PYEXEC_CLEANUP_TTL": "-3"}, "PYEXEC_CLEANUP_TTL"),
    ({"PYEXEC_MAX_TAR_BYTES": "0"}, "PYEXEC_MAX_TAR_BYTES"),
    ({"PYEXEC_MAX_TAR_ENTRIES": "0"}, "PYEXEC_MAX_TAR_ENTRIES"),
    ({"PYEXEC_NOMAD_PLACEMENT_TIMEOUT": "0"}, "PYEXEC_NOMAD_PLACEMENT_TIMEOUT"),
    ({"PYEXEC_DEFAULT_PYTHON_VERSION": "2.7"}, "PYEXEC_DEFAULT_PYTHON_VERSION"),
    ({"PYEXEC_NOMAD_RESOURCE_CLASSES": "a:1:1:1,a:2:2:2"}, "PYEXEC_NOMAD_RESOURCE_CLASSES"),
    ({"PYEXEC_NOMAD_RESOURCE_CLASSES": "a:0:512:1"}, "PYEXEC_NOMAD_RESOURCE_CLASSES"),
    ({"PYEXEC_ALLOW_NETWORK": "maybe"}, "PYEXEC_ALLOW_NETWORK"),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No PYEXEC_/Nomad/Consul variable of the machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("PYEXEC_", "NOMAD_", "CONSUL_")):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(("env", "variable"), INVALID, ids=[v for _, v in INVALID])
def test_invalid_setting_stops_serve_with_exit_2_naming_it(
    env: dict[str, str],
    variable: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each invalid value or combination ends `pyexec serve` with exit 2 and one line naming it."""

    def must_not_start(settings: Settings) -> None:
        raise AssertionError("the server started with invalid settings")

    clean_env.setattr(server, "serve", must_not_start)
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert run_cli(["serve"]) == exitcodes.USAGE == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("pyexec: ")
    assert variable in err


def test_serve_process_exits_2_on_a_default_above_its_maximum() -> None:
    """The real `pyexec serve` process refuses PYEXEC_DEFAULT_TIMEOUT above PYEXEC_MAX_TIMEOUT."""
    ours = ("PYEXEC_", "NOMAD_", "CONSUL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(PYEXEC_DEFAULT_TIMEOUT="5000", PYEXEC_MAX_TIMEOUT="3600")
    done = subprocess.run(
        [sys.executable, "-m", "pyexec.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "pyexec: PYEXEC_DEFAULT_TIMEOUT=5000 exceeds PYEXEC_MAX_TIMEOUT=3600"
    ]


def test_the_defaults_are_valid() -> None:
    """Settings with no environment at all pass every check."""
    assert Settings.from_env({}).port == 8080


def test_defaults_are_the_safe_choice() -> None:
    """Loopback, no network for runs or setup, only the configured images."""
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.allow_network is False
    assert settings.setup_network is False
    assert settings.allow_unauthenticated is False
    assert settings.allowed_images == ()


@pytest.mark.parametrize("host", [ANY, "::", "10.1.2.3", "pyexec.example"])
def test_a_public_bind_without_tokens_is_refused(host: str) -> None:
    """Binding anything but loopback without tokens stops the server, naming PYEXEC_HOST."""
    with pytest.raises(SettingsError) as info:
        server.check_exposure(Settings(host=host))
    assert "PYEXEC_HOST" in info.value.message
    assert "PYEXEC_ALLOW_UNAUTHENTICATED" in info.value.message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_tokens(host: str, caplog: pytest.LogCaptureFixture) -> None:
    """Loopback binds start quietly without tokens."""
    with caplog.at_level(logging.WARNING):
        server.check_exposure(Settings(host=host))
    assert not caplog.records


def test_tokens_allow_a_public_bind(caplog: pytest.LogCaptureFixture) -> None:
    """With tokens, any address is fine and nothing is warned about."""
    with caplog.at_level(logging.WARNING):
        server.check_exposure(Settings(host=ANY, api_tokens=("t",)))
    assert not caplog.records


def test_an_empty_token_file_counts_as_no_tokens(tmp_path: os.PathLike[str]) -> None:
    """A token file with only comments protects nothing: a public bind is refused."""
    path = os.path.join(tmp_path, "tokens")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# none yet\n\n")
    with pytest.raises(SettingsError):
        server.check_exposure(Settings(host=ANY, api_token_file=path))


def test_opting_in_warns_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """The explicit opt-in serves without tokens and logs a warning saying so."""
    with caplog.at_level(logging.WARNING, logger="pyexec.server"):
        server.check_exposure(Settings(host=ANY, allow_unauthenticated=True))
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "WITHOUT API tokens" in caplog.records[0].getMessage()


def test_the_cli_flag_is_the_opt_in(clean_env: pytest.MonkeyPatch) -> None:
    """`pyexec serve --allow-unauthenticated` sets the same setting as the variable."""
    seen: list[Settings] = []
    clean_env.setattr(server, "serve", seen.append)
    clean_env.setenv("PYEXEC_HOST", ANY)
    assert run_cli(["serve", "--allow-unauthenticated"]) == 0
    assert seen[0].allow_unauthenticated is True
    assert Settings.from_env({"PYEXEC_ALLOW_UNAUTHENTICATED": "1"}).allow_unauthenticated
