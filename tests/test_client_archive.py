"""Tar helpers: deterministic bytes, ignore rules, paths that must not escape."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from pyexec.client import (
    ArchiveError,
    archive_names,
    tar_from_directory,
    tar_from_files,
    tar_from_mapping,
    tar_from_stream,
)
from pyexec.client import archive as archive_module


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def make_project(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "main.py").write_text("import pkg.util\n")
    (root / "pkg" / "util.py").write_text("X = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)


def test_mapping_bytes_do_not_depend_on_order() -> None:
    """The same files in any insertion order give identical bytes."""
    one = tar_from_mapping({"main.py": "print(1)", "a/b.py": b"x"})
    two = tar_from_mapping({"a/b.py": b"x", "main.py": "print(1)"})
    assert one == two
    assert list(members(one)) == ["a/b.py", "main.py"]


def test_directory_bytes_are_reproducible(tmp_path: Path) -> None:
    """A directory archived twice, with new mtimes in between, gives identical bytes."""
    make_project(tmp_path)
    with tar_from_directory(tmp_path) as first:
        before = first.read()
    for path in tmp_path.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    with tar_from_directory(tmp_path) as second:
        assert second.read() == before
    info = members(before)
    assert sorted(info) == ["main.py", "pkg/util.py", "run.sh"]
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in info.values()} == {(0, 0, 0, "")}
    assert (info["run.sh"].mode, info["main.py"].mode) == (0o755, 0o644)


def test_directory_skips_tool_dirs_and_ignore_file(tmp_path: Path) -> None:
    """.git, __pycache__, .venv and .pyexecignore patterns are left out."""
    make_project(tmp_path)
    for junk in (".git/config", "__pycache__/m.pyc", ".venv/bin/python", "pkg/__pycache__/x.pyc"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("junk")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.csv").write_text("1,2\n")
    (tmp_path / "notes.log").write_text("log")
    (tmp_path / ".pyexecignore").write_text("# comments are fine\n*.log\ndata/\n")
    with tar_from_directory(tmp_path) as tar:
        names = archive_names(tar)
    assert names == [".pyexecignore", "main.py", "pkg/util.py", "run.sh"]


@pytest.mark.parametrize(
    "name", ["../evil.py", "/etc/passwd", "a/../../b.py", "", "C:/x.py", "a//b"]
)
def test_mapping_rejects_escaping_names(name: str) -> None:
    """A name that is absolute, empty or climbs out of the archive is refused."""
    with pytest.raises(ArchiveError):
        tar_from_mapping({name: "x"})


def test_files_keep_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are named by their path relative to the root; files outside it are refused."""
    make_project(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "proj")
    with tar_from_files(["main.py", Path("pkg/util.py")]) as tar:
        assert archive_names(tar) == ["main.py", "pkg/util.py"]
    (tmp_path / "outside.py").write_text("x")
    with pytest.raises(ArchiveError, match="outside"):
        tar_from_files(["../outside.py"])


def test_symlinks_inside_are_files_and_escapes_are_refused(tmp_path: Path) -> None:
    """A link to a file inside the directory is archived as that file; one leading out fails."""
    make_project(tmp_path / "proj")
    (tmp_path / "proj" / "alias.py").symlink_to(tmp_path / "proj" / "main.py")
    with tar_from_directory(tmp_path / "proj") as tar:
        info = members(tar.read())
    assert info["alias.py"].isfile()
    assert info["alias.py"].size == info["main.py"].size
    (tmp_path / "secret").write_text("s")
    (tmp_path / "proj" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(ArchiveError, match="links outside"):
        tar_from_directory(tmp_path / "proj")


def test_stream_wraps_a_script_and_passes_a_tar_through() -> None:
    """A script on a stream becomes one file; a tar stream is kept byte for byte."""
    with tar_from_stream(io.BytesIO(b"print(1)\n"), name="job.py") as tar:
        data = tar.read()
    assert data == tar_from_mapping({"job.py": "print(1)\n"})
    with tar_from_stream(io.BytesIO(data)) as again:
        assert again.read() == data
    with pytest.raises(ArchiveError, match="empty"):
        tar_from_stream(io.BytesIO(b""))


def test_large_archives_are_spooled_to_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archive above the spool limit is built in a real temporary file, not in memory."""
    monkeypatch.setattr(archive_module, "SPOOL_LIMIT", 4096)
    (tmp_path / "main.py").write_bytes(b"#" * 10_000)
    with tar_from_directory(tmp_path) as big:
        assert not isinstance(big, io.BytesIO)
        assert big.fileno() >= 0
        assert archive_names(big) == ["main.py"]
    with tar_from_stream(io.BytesIO(b"#" * 10_000)) as streamed:
        assert not isinstance(streamed, io.BytesIO)


def test_duplicate_and_missing_inputs_are_refused(tmp_path: Path) -> None:
    """Empty inputs, directories passed as files, and missing files raise ArchiveError."""
    with pytest.raises(ArchiveError):
        tar_from_mapping({})
    with pytest.raises(ArchiveError, match="directory"):
        tar_from_files([tmp_path], root=tmp_path.parent)
    with pytest.raises(ArchiveError, match="no such file"):
        tar_from_files([tmp_path / "nope.py"], root=tmp_path)
    with pytest.raises(ArchiveError, match="no files"):
        tar_from_directory(tmp_path)
