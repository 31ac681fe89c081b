"""``pyexec cache ls|prune`` on a cache directory of this host."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyexec.cli import run_cli
from pyexec.deps import cachedir
from pyexec.deps.cachedir import CacheDir


def add_env(cache: CacheDir, key: str, size: int) -> None:
    """A finished environment of ``size`` bytes, published by the cache's own rules."""
    build = cache.new_build(key)
    Path(build, "site", "mod.py").write_text("x" * size)
    cachedir.write_marker(build, key, {"requirements": [f"pkg-{key}"], "target": {}})
    assert cache.publish(build, key) is not None


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CacheDir:
    monkeypatch.setenv("PYEXEC_DEPS_CACHE_DIR", str(tmp_path))
    made = CacheDir(str(tmp_path))
    made.prepare()
    return made


def test_ls_lists_environments_least_recently_used_first(
    cache: CacheDir, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each environment with its size and requirements, and the total."""
    add_env(cache, "aaaa", 100)
    add_env(cache, "bbbb", 200)
    assert run_cli(["cache", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["aaaa", "bbbb"]
    assert lines[0].endswith("pkg-aaaa")
    assert lines[-1] == "2 environments, 300 B"


def test_ls_json_says_which_environment_is_in_use(
    cache: CacheDir, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json gives one list; an environment a run holds shows in_use."""
    add_env(cache, "aaaa", 10)
    fd = cache.try_use("aaaa")
    assert fd is not None
    try:
        assert run_cli(["cache", "ls", "--json"]) == 0
    finally:
        cache.unlock(fd)
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["key"], entry["bytes"], entry["in_use"]) == ("aaaa", 10, True)


def test_prune_all_keeps_what_is_in_use(
    cache: CacheDir, capsys: pytest.CaptureFixture[str]
) -> None:
    """--all removes every environment but one a run uses, which it names on stderr."""
    add_env(cache, "aaaa", 10)
    add_env(cache, "bbbb", 10)
    fd = cache.try_use("bbbb")
    assert fd is not None
    try:
        assert run_cli(["cache", "prune", "--all"]) == 0
    finally:
        cache.unlock(fd)
    out, err = capsys.readouterr()
    assert out == "removed aaaa\n"
    assert "bbbb is in use" in err
    assert [entry.key for entry in cache.entries()] == ["bbbb"]


def test_prune_evicts_down_to_the_cap_and_sweeps_killed_builds(
    cache: CacheDir, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without arguments it applies PYEXEC_DEPS_CACHE_BYTES (here --max-bytes), oldest
    first, and removes a build nobody is building."""
    add_env(cache, "aaaa", 100)
    add_env(cache, "bbbb", 100)
    leftover = cache.new_build("cccc")
    assert run_cli(["cache", "prune", "--max-bytes", "150"]) == 0
    assert capsys.readouterr().out == "removed aaaa\n"
    assert [entry.key for entry in cache.entries()] == ["bbbb"]
    assert not Path(leftover).exists()


def test_prune_of_an_unknown_key_is_a_usage_error(
    cache: CacheDir, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key the cache does not hold changes nothing and exits 2."""
    add_env(cache, "aaaa", 10)
    assert run_cli(["cache", "prune", "--key", "zzzz"]) == 2
    assert "no environment zzzz" in capsys.readouterr().err
    assert len(cache.entries()) == 1


def test_a_missing_cache_directory_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pointing at a directory that does not exist says so and exits 2."""
    monkeypatch.setenv("PYEXEC_DEPS_CACHE_DIR", str(tmp_path / "nowhere"))
    assert run_cli(["cache", "ls"]) == 2
    assert "no dependency cache" in capsys.readouterr().err
