"""Artifacts without a sandbox: patterns, the collector, the host's check, the stdout split,
the stores, the record and the API's validation."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from pyexec.artifacts import MAX_ARTIFACT_FILES, ArtifactStream, read_artifacts
from pyexec.errors import BadRequest, LimitExceeded, NotFound
from pyexec.models import (
    Artifact,
    Execution,
    Reason,
    RunOutcome,
    Status,
    new_execution_id,
    parse_request,
)
from pyexec.sandbox.collect import (
    COMPLETE,
    TRUNCATED,
    check_pattern,
    matches,
    may_hold,
    write_artifacts,
)
from pyexec.store import Store

from . import fixtures_consul
from .conftest import app_client, make_settings
from .fakes import FakeRunner
from .tarfiles import make_tar

# The shared fixtures, by name.
consul_prefix = fixtures_consul.consul_prefix
consul_settings = fixtures_consul.consul_settings


def collect(root: Path, patterns: list[str], cap: int = 1 << 20, max_files: int = 100) -> bytes:
    out = io.BytesIO()
    write_artifacts(out, str(root), patterns, cap, max_files)
    return out.getvalue()


def names(tar: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return archive.getnames()


@pytest.mark.parametrize(
    ("pattern", "path", "hit"),
    [
        ("out/*.png", "out/a.png", True),
        ("out/*.png", "out/sub/a.png", False),
        ("out/*.png", "out/a.pngx", False),
        ("results/**", "results/a", True),
        ("results/**", "results/x/y/z.csv", True),
        ("results/**", "results", False),
        ("**/*.csv", "a.csv", True),
        ("**/*.csv", "d/e/a.csv", True),
        ("a/**/b.txt", "a/b.txt", True),
        ("a/**/b.txt", "a/x/y/b.txt", True),
        ("data?.[ct]sv", "data1.csv", True),
        ("data?.[ct]sv", "data12.csv", False),
        ("*", ".hidden", True),
    ],
)
def test_globs_match_by_path_part(pattern: str, path: str, hit: bool) -> None:
    """``*`` and ``?`` stay within a part; ``**`` spans any number of directories."""
    assert matches([pattern], path) is hit


def test_only_directories_that_may_hold_a_match_are_walked() -> None:
    """The walk skips directories no pattern reaches below."""
    assert may_hold(["out/*.png"], "out")
    assert not may_hold(["out/*.png"], "node_modules")
    assert not may_hold(["out/*.png"], "out/sub")
    assert may_hold(["**/*.png"], "deep/er")


@pytest.mark.parametrize(
    "pattern", ["/etc/passwd", "../x", "a/../../b", "a//b", "./a", "", "a\\b", "a\x00b", 5]
)
def test_patterns_leaving_the_working_directory_are_refused(pattern: Any) -> None:
    """Absolute paths, '..', empty parts and non-strings never become patterns."""
    assert check_pattern(pattern) is not None


def test_the_request_checks_patterns_with_stable_codes() -> None:
    """A bad pattern is 400 invalid_artifact_pattern; too many is too_many_artifact_patterns."""
    settings = make_settings()
    ok = parse_request({"artifacts": ["out/*", "out/*"]}, settings)
    assert ok.artifacts == ("out/*",)
    with pytest.raises(BadRequest) as bad:
        parse_request({"artifacts": ["../secret"]}, settings)
    assert bad.value.code == "invalid_artifact_pattern"
    with pytest.raises(BadRequest) as absolute:
        parse_request({"artifacts": ["/etc/*"]}, settings)
    assert absolute.value.code == "invalid_artifact_pattern"
    with pytest.raises(LimitExceeded) as many:
        parse_request({"artifacts": [f"f{i}" for i in range(33)]}, settings)
    assert many.value.code == "too_many_artifact_patterns"
    with pytest.raises(BadRequest) as kind:
        parse_request({"artifacts": "out/*"}, settings)
    assert kind.value.code == "invalid_field"


def test_the_cap_has_a_default_and_a_server_maximum() -> None:
    """config.max_artifact_bytes defaults to 16 MiB and may not pass the server's maximum."""
    settings = make_settings(max_artifact_bytes=1000, default_max_artifact_bytes=500)
    assert parse_request({}, settings).config.max_artifact_bytes == 500
    assert make_settings().default_max_artifact_bytes == 16 * 1024 * 1024
    with pytest.raises(LimitExceeded) as over:
        parse_request({"config": {"max_artifact_bytes": 1001}}, settings)
    assert over.value.code == "limit_exceeded"


def test_the_collector_never_follows_links_or_returns_special_files(tmp_path: Path) -> None:
    """Symlinks (to files and directories, inside or outside) and fifos are skipped; the
    sandbox's own .pyexec directory is never collected."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    root = tmp_path / "work"
    (root / "out").mkdir(parents=True)
    (root / ".pyexec").mkdir()
    (root / ".pyexec" / "x.txt").write_text("state")
    (root / "out" / "real.txt").write_text("real")
    os.symlink(outside / "secret.txt", root / "out" / "link.txt")
    os.symlink(outside, root / "out" / "dir")
    os.symlink("real.txt", root / "out" / "alias.txt")
    os.mkfifo(root / "out" / "pipe.txt")
    assert names(collect(root, ["**"])) == ["out/real.txt", COMPLETE]


def test_the_collector_stops_at_the_cap_and_says_so(tmp_path: Path) -> None:
    """Files go in path order while they fit; then the truncation mark ends the tar."""
    for i in range(4):
        (tmp_path / f"f{i}.bin").write_bytes(bytes(10))
    assert names(collect(tmp_path, ["*.bin"], cap=25)) == ["f0.bin", "f1.bin", TRUNCATED]
    assert names(collect(tmp_path, ["*.bin"], cap=40)) == [f"f{i}.bin" for i in range(4)] + [
        COMPLETE
    ]
    assert names(collect(tmp_path, ["*.bin"], max_files=3))[-1] == TRUNCATED


def test_the_collector_runs_on_the_oldest_supported_python(tmp_path: Path) -> None:
    """collect.py compiles as Python 3.8 source (it runs in whatever image a request names)."""
    source = Path("pyexec/sandbox/collect.py").read_text()
    import ast

    ast.parse(source, feature_version=(3, 8))


def forged(members: list[tuple[str, bytes | None, str]], *, end: bool = True) -> io.BytesIO:
    """A tar as a misbehaving sandbox could send: (name, data, kind) per member, then the
    collector's last member (unless ``end`` is false)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, data, kind in [*members, *([(COMPLETE, b"", "file")] if end else [])]:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(data or b"")
                archive.addfile(info, io.BytesIO(data or b""))
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, (data or b"").decode()
                archive.addfile(info)
            elif kind == "device":
                info.type = tarfile.CHRTYPE
                archive.addfile(info)
    buf.seek(0)
    return buf


def test_the_host_checks_what_the_sandbox_sent() -> None:
    """Links, devices, unasked-for and .pyexec files are dropped; sizes and digests are the
    host's own; the blob is a tar of exactly the kept files at the offsets listed."""
    sent = forged(
        [
            ("out/a.txt", b"alpha", "file"),
            ("out/link.txt", b"/etc/passwd", "symlink"),
            ("out/dev.txt", None, "device"),
            ("other.txt", b"not asked", "file"),
            (".pyexec/out/x.txt", b"state", "file"),
        ]
    )
    got = read_artifacts(sent, ["out/*", ".pyexec/**"], 1000)
    assert got.blob is not None
    blob = got.blob.read()
    assert [a.path for a in got.files] == ["out/a.txt"]
    item = got.files[0]
    assert (item.size, item.sha256) == (5, hashlib.sha256(b"alpha").hexdigest())
    assert blob[item.offset : item.offset + item.size] == b"alpha"
    assert names(blob) == ["out/a.txt"]
    assert got.truncated is True  # the link broke the tar rules: the rest is not read
    got.close()


def test_the_host_refuses_traversal_and_keeps_what_came_before() -> None:
    """A member leaving the directory ends the check: files before it stay, truncated."""
    sent = forged([("a.txt", b"a", "file"), ("../escape.txt", b"x", "file")])
    got = read_artifacts(sent, ["**"], 1000)
    assert [a.path for a in got.files] == ["a.txt"]
    assert got.truncated
    got.close()


def test_the_host_enforces_the_cap_exactly() -> None:
    """However much a sandbox sends, the total kept never passes the cap."""
    sent = forged([(f"f{i}", bytes(100), "file") for i in range(5)])
    got = read_artifacts(sent, ["*"], 250)
    assert [a.size for a in got.files] == [100, 100]
    assert got.truncated
    got.close()
    sent = forged([(f"f{i}", bytes(100), "file") for i in range(5)])
    exact = read_artifacts(sent, ["*"], 500)
    assert sum(a.size for a in exact.files) == 500
    assert not exact.truncated
    exact.close()
    assert MAX_ARTIFACT_FILES >= 5


def test_a_tar_cut_short_keeps_its_whole_members() -> None:
    """A stream that ends inside a member keeps the members before it, in a valid tar."""
    whole = forged([("a", b"A" * 600, "file"), ("b", b"B" * 600, "file")]).getvalue()
    for cut in (2000, 2300):  # inside the header of b; inside its data
        got = read_artifacts(io.BytesIO(whole[:cut]), ["*"], 10_000)
        assert [a.path for a in got.files] == ["a"]
        assert got.truncated
        got.close()
    got = read_artifacts(io.BytesIO(whole[:2000]), ["*"], 10_000)
    assert [a.path for a in got.files] == ["a"]
    assert got.truncated
    assert got.blob is not None
    assert names(got.blob.read()) == ["a"]
    got.close()


def test_the_stdout_split_holds_back_a_possible_mark() -> None:
    """Output before the mark is the program's, split anywhere; after it, the tar."""
    stream = ArtifactStream("ab12", 10_000)
    mark = stream.mark
    tar = forged([("x.txt", b"x", "file")]).getvalue()
    data = b"hello\x00pyexec" + b" world\n" + mark + tar
    out = b""
    for i in range(0, len(data), 3):
        out += stream.feed(data[i : i + 3])
    out += stream.finish()
    assert out == b"hello\x00pyexec world\n"
    got = stream.collected(["*.txt"], 100)
    assert [a.path for a in got.files] == ["x.txt"]
    got.close()


def test_output_ending_like_the_mark_is_released_at_the_end() -> None:
    """A held-back prefix of the mark comes back when stdout ends without it."""
    stream = ArtifactStream("ab12", 10_000)
    assert stream.feed(b"text" + stream.mark[:8]) == b"text"
    assert stream.finish() == stream.mark[:8]
    assert stream.collected(["*"], 100).files == ()


def test_records_list_artifacts_at_the_end_and_old_records_load() -> None:
    """The public record ends with artifacts and artifacts_truncated (no offsets); a
    record stored before artifacts existed loads with none."""
    item = Artifact(path="a.png", size=3, sha256="0" * 64, offset=512)
    record = Execution(execution_id="exe_x", status=Status.PENDING).finished(
        RunOutcome(reason=Reason.EXITED, exit_code=0, artifacts=(item,), artifacts_truncated=True)
    )
    public = record.to_dict()
    assert list(public)[-2:] == ["artifacts", "artifacts_truncated"]
    assert public["artifacts"] == [{"path": "a.png", "size": 3, "sha256": "0" * 64}]
    assert Execution.from_dict(record.to_dict(include_request=True)).artifacts == (item,)
    old = dict(public)
    del old["artifacts"], old["artifacts_truncated"]
    assert Execution.from_dict(old).artifacts == ()


store = fixtures_consul.store


async def read(store: Store, execution_id: str, *span: int) -> bytes:
    return b"".join([chunk async for chunk in store.open_artifacts(execution_id, *span)])


@pytest.mark.anyio
async def test_a_store_keeps_artifacts_until_the_record_goes(store: Store) -> None:
    """A stored blob (several chunks) reads back whole or by any range; deleting the
    record deletes it; a record without one answers artifact_not_found."""
    execution_id = new_execution_id()
    await store.create(Execution(execution_id=execution_id), None)
    with pytest.raises(NotFound) as missing:
        await read(store, execution_id)
    assert missing.value.code == "artifact_not_found"
    blob = bytes(range(256)) * 4000  # a little under 1 MiB: four chunks
    await store.put_artifacts(execution_id, io.BytesIO(blob))
    assert await read(store, execution_id) == blob
    for start, length in ((0, 5), (262_140, 10), (300_000, 400_000), (1_023_990, 100)):
        assert await read(store, execution_id, start, length) == blob[start : start + length]
    await store.delete(execution_id)
    with pytest.raises(NotFound):
        await read(store, execution_id)


@pytest.mark.anyio
async def test_bad_patterns_are_refused_before_anything_runs(api: httpx.AsyncClient) -> None:
    """The API answers 400 with the stable code, for exec and eval alike."""
    tar = make_tar({"main.py": "print(1)"})
    response = await api.post(
        "/api/v1/exec/sync",
        files={"tar": ("t.tar", tar, "application/x-tar")},
        data={"metadata": '{"artifacts": ["/etc/passwd"]}'},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_artifact_pattern"
    response = await api.post("/api/v1/eval", json={"code": "1", "artifacts": ["a/../../b"]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_artifact_pattern"


def test_the_bootstrap_source_still_compiles() -> None:
    """bootstrap + tarcheck + collect form one program that Python 3.8 can parse."""
    from pyexec.sandbox import bootstrap_source

    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"compile({bootstrap_source()!r}, 'b', 'exec')"],
        check=False,
    )
    assert proc.returncode == 0


class KilledWithArtifacts(FakeRunner):
    """A runner whose killed runs still hand over what they wrote (as the Nomad run task
    does when it is stopped)."""

    async def kill(self, execution_id: str) -> None:
        self.killed.append(execution_id)
        future = self._done.get(execution_id)
        if future is not None and not future.done():
            got = read_artifacts(forged([("left.txt", b"left", "file")]), ["*.txt"], 100)
            future.set_result(
                RunOutcome(
                    reason=Reason.KILLED,
                    stdout="so far",
                    artifacts=got.files,
                    artifacts_truncated=got.truncated,
                    artifact_blob=got.blob,
                )
            )


@pytest.mark.anyio
async def test_a_killed_run_keeps_the_artifacts_its_runner_collected() -> None:
    """The killed verdict stands, and the files the run left are listed and served."""
    async with app_client(make_settings(), runner=KilledWithArtifacts()) as client:
        response = await client.post(
            "/api/v1/exec/async",
            files={"tar": ("t.tar", make_tar({"main.py": "x"}), "application/x-tar")},
            data={"metadata": '{"stdin": "hold", "artifacts": ["*.txt"]}'},
        )
        execution_id = response.json()["execution_id"]
        await client.delete(f"/api/v1/executions/{execution_id}")
        for _ in range(100):  # the killed record gets the output once the run reports
            record = (await client.get(f"/api/v1/executions/{execution_id}?wait=1")).json()
            if record["artifacts"]:
                break
            await asyncio.sleep(0.05)
        assert record["status"] == "killed"
        assert [a["path"] for a in record["artifacts"]] == ["left.txt"]
        data = await client.get(f"/api/v1/executions/{execution_id}/artifacts/left.txt")
        assert data.content == b"left"


def test_a_name_sent_twice_is_kept_once() -> None:
    """A forged tar repeating a path cannot list it twice (the first copy stands)."""
    got = read_artifacts(forged([("a.txt", b"1", "file"), ("a.txt", b"22", "file")]), ["*"], 99)
    assert [(a.path, a.size) for a in got.files] == [("a.txt", 1)]
    got.close()


def test_the_grace_for_collecting_stays_inside_the_services_slack() -> None:
    """The local runner waits past the timeout for artifacts only when asked, and never
    so long that the service (pyexec.deadline) gives up on the run first."""
    from pyexec.deadline import SLACK_SECONDS
    from pyexec.runner.docker_spec import artifact_grace

    settings = make_settings(max_artifact_bytes=1 << 40)
    assert artifact_grace(parse_request({}, settings)) == 0.0
    small = parse_request({"artifacts": ["*"]}, settings)
    huge = parse_request({"artifacts": ["*"], "config": {"max_artifact_bytes": 1 << 40}}, settings)
    assert 0 < artifact_grace(small) < artifact_grace(huge) <= SLACK_SECONDS / 2
