"""Artifacts through the Python client (both twins), the CLI, eval's inline form and the
MCP tool result, against a live server on the embedded default (real Docker)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyexec.cli import run_cli
from pyexec.client import ArchiveError, AsyncClient, Client, Execution, RunOptions
from pyexec.client.models import Artifact
from pyexec.mcp.tools import artifact_content

from .artifact_files import CSV, PNG_PROGRAM, png_bytes
from .conftest import LiveServer, live_server, make_settings

pytestmark = pytest.mark.docker

EXPECTED = {"out/plot.png": png_bytes(), "results/2024/table.csv": CSV.encode()}
PATTERNS = ("out/*.png", "results/**")


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with live_server(make_settings()) as live:
        yield live


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()
    }


def test_the_blocking_client_lists_and_downloads_them(server: LiveServer, tmp_path: Path) -> None:
    """result.artifacts lists them; download_artifacts writes them byte-exact under dest."""
    with Client(server.url) as client:
        record = client.run({"main.py": PNG_PROGRAM}, RunOptions(artifacts=PATTERNS))
        assert {a.path: a.sha256 for a in record.artifacts} == {
            path: hashlib.sha256(data).hexdigest() for path, data in EXPECTED.items()
        }
        assert record.artifacts_truncated is False
        written = client.download_artifacts(record.execution_id, tmp_path / "dest")
    assert sorted(written) == sorted(tmp_path / "dest" / p for p in EXPECTED)
    assert files_under(tmp_path / "dest") == EXPECTED


@pytest.mark.anyio
async def test_the_async_client_downloads_them_too(server: LiveServer, tmp_path: Path) -> None:
    """The asyncio twin writes the same files."""
    async with AsyncClient(server.url) as client:
        record = await client.run({"main.py": PNG_PROGRAM}, RunOptions(artifacts=PATTERNS))
        await client.download_artifacts(record.execution_id, tmp_path)
    assert files_under(tmp_path) == EXPECTED


def test_a_download_never_writes_through_a_link_in_dest(server: LiveServer, tmp_path: Path) -> None:
    """A symlink already in dest pointing elsewhere is refused, not written through."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "out")
    with Client(server.url) as client:
        record = client.run({"main.py": PNG_PROGRAM}, RunOptions(artifacts=["out/*.png"]))
        with pytest.raises(ArchiveError):
            client.download_artifacts(record.execution_id, dest)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "eval"])
def test_the_cli_writes_them_to_the_output_dir_and_lists_them(
    server: LiveServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """`pyexec run main.py` and `pyexec eval FILE` with `--artifacts ... --output-dir DIR`
    write them and list them on stderr, after the program's output; the program's stdout
    stays the program's."""
    program = tmp_path / "main.py"
    program.write_text(PNG_PROGRAM)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    argv = ["--server", server.url, command, str(program), "--output-dir", str(tmp_path / "got")]
    code = run_cli([*argv, "--artifacts", "out/*.png", "--artifacts", "results/**"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == "drew\n"
    assert files_under(tmp_path / "got") == EXPECTED
    for path, data in EXPECTED.items():
        assert f"artifact {path} ({len(data)} bytes) -> {tmp_path / 'got' / path}" in captured.err


def test_eval_returns_them_inline_when_asked(server: LiveServer) -> None:
    """inline_artifacts gives each file's bytes in the answer; without it, only the list."""
    with Client(server.url) as client:
        options = RunOptions(artifacts=PATTERNS)
        inline = client.eval(PNG_PROGRAM, options=options, inline_artifacts=True)
        plain = client.eval(PNG_PROGRAM, options=options)
    assert {a.path: a.content for a in inline.artifacts} == EXPECTED
    assert all(a.content is None for a in plain.artifacts)
    assert {a.path for a in plain.artifacts} == set(EXPECTED)
    raw = inline.raw["artifacts"][0]
    assert base64.b64decode(raw["content_base64"]) == EXPECTED[raw["path"]]


def test_the_mcp_result_shows_an_image_as_image_content() -> None:
    """An inline PNG becomes an image block, a CSV text; a file without bytes is named."""
    record = Execution.from_json(
        {
            "execution_id": "exe_x",
            "status": "completed",
            "artifacts": [
                {
                    "path": "out/plot.png",
                    "size": 3,
                    "sha256": "a" * 64,
                    "content_base64": base64.b64encode(b"png").decode(),
                },
                {
                    "path": "t.csv",
                    "size": 4,
                    "sha256": "b" * 64,
                    "content_base64": base64.b64encode(b"a,b\n").decode(),
                },
                {"path": "big.bin", "size": 9_000_000, "sha256": "c" * 64},
            ],
        }
    )
    image, text, named = artifact_content(record)
    dumped: dict[str, Any] = image.model_dump(by_alias=True)
    assert (dumped["type"], dumped["mimeType"]) == ("image", "image/png")
    assert base64.b64decode(dumped["data"]) == b"png"
    assert text.model_dump()["text"] == "--- artifact t.csv ---\na,b\n"
    assert "big.bin: 9000000 bytes" in named.model_dump()["text"]
    assert record.artifacts[0] == Artifact(
        path="out/plot.png", size=3, sha256="a" * 64, content=b"png"
    )


def test_the_tar_download_is_a_plain_tar(server: LiveServer) -> None:
    """What download_artifacts unpacks is an ordinary tar of regular files."""
    import httpx

    with Client(server.url) as client:
        record = client.run({"main.py": PNG_PROGRAM}, RunOptions(artifacts=PATTERNS))
    data = httpx.get(f"{server.url}/api/v1/executions/{record.execution_id}/artifacts").content
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        assert all(member.isfile() for member in archive.getmembers())
        assert sorted(archive.getnames()) == sorted(EXPECTED)
