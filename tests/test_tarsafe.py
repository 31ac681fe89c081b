"""Uploaded tars: what validate_tar rejects and what safe_extract writes (in-memory archives)."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest

from pyexec.errors import PayloadTooLarge, TarRejected
from pyexec.tarsafe import safe_extract, validate_tar

MAX_ENTRIES = 10_000
MAX_BYTES = 1024 * 1024 * 1024


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple:
    return name, kind, data, link


def build(*members: tuple, fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar of ``members`` as ``(name, type, data, linkname)``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, data, link in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = link
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def validate(data: bytes, entrypoint: str | None = "main.py", **limits: int) -> object:
    return validate_tar(
        io.BytesIO(data),
        entrypoint=entrypoint,
        max_entries=limits.get("max_entries", MAX_ENTRIES),
        max_bytes=limits.get("max_bytes", MAX_BYTES),
    )


def rejected(data: bytes, code: str, entrypoint: str | None = "main.py") -> None:
    with pytest.raises(TarRejected) as info:
        validate(data, entrypoint)
    assert info.value.code == code, info.value.message
    assert info.value.status_code == 400


GOOD = build(
    member("main.py", data=b"import pkg.util\n"),
    member("pkg", tarfile.DIRTYPE),
    member("pkg/__init__.py"),
    member("pkg/util.py", data=b"X = 1\n"),
    member("pkg/data", tarfile.DIRTYPE),
    member("pkg/data/table.csv", data=b"a,b\n1,2\n"),
    member("pkg/alias.py", tarfile.SYMTYPE, link="util.py"),
    member("pkg/data/up.csv", tarfile.SYMTYPE, link="../data/table.csv"),
    member("copy.py", tarfile.LNKTYPE, link="pkg/util.py"),
)


def test_good_nested_project_passes_and_is_rewound() -> None:
    """A nested project with in-tree links passes, and the file is left where it started."""
    fileobj = io.BytesIO(b"junk" + GOOD)
    fileobj.seek(4)
    summary = validate_tar(fileobj, entrypoint="main.py", max_entries=100, max_bytes=10_000)
    assert summary.entries == 9
    assert summary.total_bytes == len(b"import pkg.util\n") + len(b"X = 1\n") + len(b"a,b\n1,2\n")
    assert fileobj.tell() == 4


def test_unseekable_stream_is_validated() -> None:
    """An upload that cannot seek is read through in stream mode with the same rules."""

    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            return self._data.readinto(buffer)

    validate_tar(Pipe(GOOD), entrypoint="main.py", max_entries=100, max_bytes=10_000)  # type: ignore[arg-type]
    bad = build(member("main.py"), member("../x"))
    with pytest.raises(TarRejected) as info:
        validate_tar(Pipe(bad), entrypoint="main.py", max_entries=100, max_bytes=10_000)  # type: ignore[arg-type]
    assert info.value.code == "tar_path_traversal"


def test_nested_entrypoint_and_dot_slash_names() -> None:
    """Names like ./src/app.py match the entrypoint src/app.py."""
    data = build(member("./", tarfile.DIRTYPE), member("./src/app.py", data=b"print(1)"))
    validate(data, "src/app.py")


def test_parent_traversal_is_rejected() -> None:
    """A member named ../x is refused."""
    rejected(build(member("main.py"), member("../x")), "tar_path_traversal")


def test_traversal_in_the_middle_is_rejected() -> None:
    """a/../../x is refused even though it starts inside."""
    rejected(build(member("main.py"), member("a/../../x")), "tar_path_traversal")


def test_absolute_path_is_rejected() -> None:
    """A member named /etc/x is refused."""
    rejected(build(member("main.py"), member("/etc/x")), "tar_absolute_path")


def test_symlink_to_absolute_target_is_rejected() -> None:
    """A symlink to /etc/passwd is refused."""
    rejected(
        build(member("main.py"), member("passwd", tarfile.SYMTYPE, link="/etc/passwd")),
        "tar_link_escape",
    )


def test_symlink_climbing_out_is_rejected() -> None:
    """A relative symlink that climbs above the archive root is refused."""
    rejected(
        build(member("main.py"), member("a/b", tarfile.SYMTYPE, link="../../etc")),
        "tar_link_escape",
    )


def test_writing_through_a_symlink_is_rejected() -> None:
    """A member whose path goes under an earlier symlink is refused, even an in-tree one."""
    rejected(
        build(
            member("main.py"),
            member("sub", tarfile.DIRTYPE),
            member("link", tarfile.SYMTYPE, link="sub"),
            member("link/x.py"),
        ),
        "tar_link_escape",
    )


def test_symlink_to_etc_then_write_through_it_is_rejected() -> None:
    """The classic attack (link to /etc, then write link/passwd) fails at the link."""
    rejected(
        build(
            member("main.py"),
            member("etc", tarfile.SYMTYPE, link="/etc"),
            member("etc/passwd", data=b"root::0:0::/:/bin/sh\n"),
        ),
        "tar_link_escape",
    )


def test_symlink_after_the_members_it_would_redirect_is_rejected() -> None:
    """Order does not matter: a symlink over a directory already used is refused."""
    rejected(
        build(member("main.py"), member("d/x.py"), member("d", tarfile.SYMTYPE, link=".")),
        "tar_link_escape",
    )


def test_symlink_resolving_through_another_symlink_is_rejected() -> None:
    """sub -> . plus esc -> sub/.. looks in-tree lexically but climbs out: refused."""
    rejected(
        build(
            member("main.py"),
            member("esc", tarfile.SYMTYPE, link="sub/.."),
            member("sub", tarfile.SYMTYPE, link="."),
        ),
        "tar_link_escape",
    )


def test_hardlink_out_of_the_tree_is_rejected() -> None:
    """Hard links to /etc/passwd or ../x are refused."""
    for target in ("/etc/passwd", "../outside"):
        rejected(
            build(member("main.py"), member("h", tarfile.LNKTYPE, link=target)),
            "tar_link_escape",
        )


def test_hardlink_to_a_symlink_is_rejected() -> None:
    """A hard link to a symlink (which would re-anchor its relative target) is refused."""
    rejected(
        build(
            member("main.py"),
            member("a/b/l", tarfile.SYMTYPE, link="../../main.py"),
            member("h", tarfile.LNKTYPE, link="a/b/l"),
        ),
        "tar_link_escape",
    )


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_special_files_are_rejected(kind: bytes) -> None:
    """Device nodes and fifos are refused."""
    rejected(build(member("main.py"), member("dev", kind)), "tar_special_file")


def test_too_many_entries_is_413() -> None:
    """100k entries against a 10k cap is refused as too large."""
    header = b"".join(tarfile.TarInfo(f"f{i}").tobuf(tarfile.USTAR_FORMAT) for i in range(100_000))
    with pytest.raises(PayloadTooLarge) as info:
        validate(header + b"\0" * 1024)
    assert info.value.code == "tar_too_many_entries"
    assert info.value.status_code == 413


def test_huge_declared_size_is_413() -> None:
    """A header declaring a terabyte (no data behind it) is refused before any skipping."""
    info = tarfile.TarInfo("main.py")
    info.size = 10**12
    data = info.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024
    with pytest.raises(PayloadTooLarge) as raised:
        validate(data)
    assert raised.value.code == "tar_too_much_data"


def test_total_declared_size_counts_every_member() -> None:
    """Many members under the cap each can still add up to too much."""
    data = build(member("main.py", data=b"x" * 600), member("b", data=b"y" * 600))
    with pytest.raises(PayloadTooLarge) as info:
        validate(data, max_bytes=1000)
    assert info.value.code == "tar_too_much_data"


def test_oversized_pax_header_is_rejected_without_loading_it() -> None:
    """A pax header of several megabytes is refused before tarfile reads it whole."""
    info = tarfile.TarInfo("main.py")
    info.pax_headers = {"comment": "x" * (3 * 1024 * 1024)}
    data = info.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024
    rejected(data, "tar_invalid")


def test_not_a_tar_is_rejected() -> None:
    """Random bytes, an empty upload and a gzip stream are tar_invalid."""
    for data in (b"hello world" * 100, b"", b"\x1f\x8b\x08\x00" + b"\0" * 600):
        rejected(data, "tar_invalid")


def test_truncated_tar_is_rejected() -> None:
    """A member whose data is cut off is tar_invalid."""
    data = build(member("main.py", data=b"x" * 5000), member("b.py", data=b"y" * 5000))
    rejected(data[:3000], "tar_invalid")
    rejected(data[: 512 + 5120 + 512 + 100], "tar_invalid")


def test_missing_entrypoint_is_rejected() -> None:
    """The entrypoint must be a file in the archive (not absent, not a directory)."""
    rejected(build(member("other.py")), "entrypoint_not_found")
    rejected(build(member("main.py", tarfile.DIRTYPE)), "entrypoint_not_found")


def test_safe_extract_writes_the_project(tmp_path: Path) -> None:
    """A good archive is extracted with its links and contents."""
    summary = safe_extract(io.BytesIO(GOOD), tmp_path, max_entries=100, max_bytes=10_000)
    assert summary.entries == 9
    assert (tmp_path / "pkg/data/table.csv").read_text() == "a,b\n1,2\n"
    assert (tmp_path / "pkg/alias.py").read_text() == "X = 1\n"
    assert (tmp_path / "copy.py").read_text() == "X = 1\n"


def test_safe_extract_never_writes_outside(tmp_path: Path) -> None:
    """An attack mid-archive stops extraction without touching anything outside dest."""
    dest = tmp_path / "dest"
    dest.mkdir()
    attack = build(
        member("main.py", data=b"ok"),
        member("esc", tarfile.SYMTYPE, link="sub/.."),
        member("sub", tarfile.SYMTYPE, link="."),
        member("esc/owned", data=b"pwned"),
    )
    with pytest.raises(TarRejected) as info:
        safe_extract(io.BytesIO(attack), dest, max_entries=100, max_bytes=10_000)
    assert info.value.code == "tar_link_escape"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    assert not (tmp_path / "owned").exists()


def test_overlong_names_and_link_targets_are_rejected() -> None:
    """Names or link targets over PATH_MAX, or with a part over NAME_MAX, are tar_invalid."""
    rejected(build(member("main.py"), member("d/" * 2100 + "x")), "tar_invalid")
    rejected(build(member("main.py"), member("x" * 256 + "/y")), "tar_invalid")
    rejected(
        build(member("main.py"), member("l", tarfile.SYMTYPE, link="a/" * 2100)), "tar_invalid"
    )


def test_deep_paths_cost_memory_in_proportion_to_their_names() -> None:
    """Deep members are checked without building every prefix of every path."""
    deep = [member(f"m{i}/" + "a/" * 2000 + "f") for i in range(10)]
    data = build(member("main.py"), *deep, fmt=tarfile.PAX_FORMAT)
    tracemalloc.start()
    try:
        validate(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024, peak


def test_too_many_implied_directories_is_413() -> None:
    """Few members that imply many directories are refused as too large."""
    data = build(member("main.py"), member("a/" * 100 + "f"))
    with pytest.raises(PayloadTooLarge) as info:
        validate(data, max_entries=10)
    assert info.value.code == "tar_too_many_entries"


@pytest.mark.parametrize(
    "members",
    [
        ((("d", tarfile.SYMTYPE, "main.py"), ("d", tarfile.REGTYPE, ""))),
        ((("h", tarfile.LNKTYPE, "main.py"), ("h", tarfile.REGTYPE, ""))),
        ((("main.py", tarfile.LNKTYPE, "main.py"),)),
        ((("h", tarfile.LNKTYPE, "main.py"), ("h", tarfile.LNKTYPE, "main.py"))),
        ((("x", tarfile.REGTYPE, ""), ("x", tarfile.LNKTYPE, "main.py"))),
    ],
    ids=[
        "file-over-symlink",
        "file-over-hardlink",
        "hardlink-onto-itself",
        "hardlink-twice",
        "hardlink-over-file",
    ],
)
def test_a_name_reused_over_a_link_is_a_clash(members: tuple[tuple[str, bytes, str], ...]) -> None:
    """A file over a link of its name (written through it) or a hard link over an existing
    name (cannot be made) is refused: found by the property test of extraction."""
    rejected(
        build(member("main.py"), *(member(n, kind, link=link) for n, kind, link in members)),
        "tar_name_clash",
    )


def test_a_symlink_may_replace_a_file() -> None:
    """A later symlink over a file of its name unpacks (the file is removed first)."""
    validate(build(member("main.py"), member("x"), member("x", tarfile.SYMTYPE, link="main.py")))
