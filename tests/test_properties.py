"""Property-based tests (hypothesis) of the two parsers untrusted input meets first: the
metadata JSON and the tar rules."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from pyexec.errors import BadRequest, PayloadTooLarge, TarRejected
from pyexec.models import ExecutionRequest, parse_request
from pyexec.sandbox.tarcheck import DIR, FILE, HARDLINK, SPECIAL, SYMLINK, TarChecker, TarProblem
from pyexec.settings import CONFIG_FIELDS, CONFIG_MINIMA, Settings
from pyexec.tarsafe import safe_extract, validate_tar

SETTINGS = Settings(
    default_image="img:1",
    python_images=(("3.12", "img:3.12"),),
    allowed_images=("img:2",),
    allow_network=True,
    setup_network=True,
)
EXAMPLES = settings(
    max_examples=int(os.environ.get("PYEXEC_TEST_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- Metadata -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["entrypoint", "docker_image", "requirements_txt", "pre_commands", "stdin"]
FIELDS += ["env_vars", "script_args", "config", "callback_url"]
CONFIG_KEYS = [*CONFIG_MINIMA, "network_disabled"]
near_valid = st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8),
    json_values
    | st.dictionaries(st.sampled_from(CONFIG_KEYS) | st.text(max_size=4), json_values, max_size=4),
    max_size=6,
)


def parse_or_refuse(raw: Any) -> ExecutionRequest | BadRequest:
    """What parse_request gives: a request, or a 4xx error; anything else fails the test."""
    try:
        return parse_request(raw, SETTINGS)
    except BadRequest as exc:
        refused = exc
    assert 400 <= refused.status_code < 500
    assert refused.code
    assert refused.message
    return refused


@EXAMPLES
@given(json_values | near_valid)
def test_any_json_metadata_is_parsed_or_refused_with_a_4xx(raw: Any) -> None:
    """Any JSON value as metadata gives a request or a BadRequest, never another error."""
    parse_or_refuse(raw)


@EXAMPLES
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_any_bytes_as_metadata_are_parsed_or_refused_with_a_4xx(raw: bytes | str) -> None:
    """Undecodable, truncated or deeply nested text is a 4xx too."""
    parse_or_refuse(raw)


@given(st.integers(min_value=1, max_value=100_000))
def test_any_nesting_depth_is_a_4xx(depth: int) -> None:
    """However deep the brackets go, the answer is 4xx."""
    assert isinstance(parse_or_refuse("[" * depth + "]" * depth), BadRequest)


names = st.from_regex(r"[a-z][a-z0-9_]{0,6}(/[a-z][a-z0-9_]{0,6}){0,2}\.py", fullmatch=True)
env_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@st.composite
def valid_metadata(draw: st.DrawFn) -> dict[str, Any]:
    config = {}
    for key, (_, maximum) in CONFIG_FIELDS.items():
        if draw(st.booleans()):
            high = getattr(SETTINGS, maximum)
            config[key] = draw(st.integers(CONFIG_MINIMA[key], high))
    if draw(st.booleans()):
        config["network_disabled"] = draw(st.booleans())
    return {
        "entrypoint": draw(names),
        "docker_image": draw(st.sampled_from(["img:1", "img:2", "img:3.12"])),
        "requirements_txt": draw(st.text(max_size=20)),
        "pre_commands": draw(st.lists(st.text(max_size=10), max_size=3)),
        "stdin": draw(st.text(max_size=20)),
        "env_vars": [
            f"{k}={v}"
            for k, v in draw(st.lists(st.tuples(env_keys, st.text(max_size=8)), max_size=3))
        ],
        "script_args": draw(st.lists(st.text(max_size=10), max_size=3)),
        "config": config,
    }


@EXAMPLES
@given(valid_metadata())
def test_valid_metadata_is_accepted_and_round_trips(raw: dict[str, Any]) -> None:
    """Metadata within the schema and the limits parses, and its stored form parses back."""
    request = parse_request(json.dumps(raw), SETTINGS)
    stored = {k: v for k, v in request.to_dict().items() if k != "version"}
    assert parse_request(stored, SETTINGS) == request
    assert ExecutionRequest.from_dict(request.to_dict()) == request
    for key, value in raw["config"].items():
        assert getattr(request.config, key) == value


@EXAMPLES
@given(st.sampled_from(sorted(CONFIG_FIELDS)), st.integers(-(2**40), 2**40))
def test_each_limit_is_enforced_exactly_at_its_bounds(key: str, value: int) -> None:
    """A limit inside [minimum, maximum] is taken as given; outside, a 400 names the field."""
    high = getattr(SETTINGS, CONFIG_FIELDS[key][1])
    outcome = parse_or_refuse({"config": {key: value}})
    if CONFIG_MINIMA[key] <= value <= high:
        assert isinstance(outcome, ExecutionRequest)
        assert getattr(outcome.config, key) == value
    else:
        assert isinstance(outcome, BadRequest)
        assert outcome.details["field"] == f"config.{key}"


# --- Tar rules ------------------------------------------------------------------------------

parts = st.sampled_from(["a", "b", "c", ".", "..", "", "main.py"])
member_names = st.lists(parts, min_size=1, max_size=4).map("/".join)
kinds = st.sampled_from([FILE, FILE, DIR, DIR, SYMLINK, HARDLINK, SPECIAL])
link_targets = st.one_of(member_names, st.just("/etc/passwd"), st.just(""))
members = st.lists(st.tuples(member_names, kinds, link_targets), max_size=8)
KNOWN_CODES = {
    "tar_invalid",
    "tar_absolute_path",
    "tar_path_traversal",
    "tar_link_escape",
    "tar_special_file",
    "tar_name_clash",
    "tar_too_many_entries",
    "tar_too_much_data",
}


@EXAMPLES
@given(members)
def test_the_checker_accepts_or_names_a_known_problem(entries: list[tuple[str, str, str]]) -> None:
    """Any sequence of members is accepted or refused with one of the documented codes."""
    checker = TarChecker(max_entries=6, max_bytes=10)
    code = None
    try:
        for name, kind, link in entries:
            checker.add(name, kind, 3, link)
    except TarProblem as problem:
        code = problem.code
    assert code is None or code in KNOWN_CODES


TYPES = {FILE: tarfile.REGTYPE, DIR: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE}
TYPES.update({HARDLINK: tarfile.LNKTYPE, SPECIAL: tarfile.FIFOTYPE})


def build(entries: list[tuple[str, str, str]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link in entries:
            info = tarfile.TarInfo(name)
            info.type = TYPES[kind]
            info.linkname = link
            data = b"abc" if kind == FILE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@settings(
    max_examples=int(os.environ.get("PYEXEC_TEST_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(members)
def test_an_accepted_tar_extracts_and_stays_inside(entries: list[tuple[str, str, str]]) -> None:
    """What validate_tar accepts, safe_extract unpacks without error and only under its
    directory: no file beside it, no link resolving outside it."""
    try:
        data = build(entries)
    except (ValueError, tarfile.TarError):  # names tarfile itself cannot write
        assume(False)
        raise
    try:
        validate_tar(io.BytesIO(data), entrypoint=None, max_entries=100, max_bytes=1000)
    except (TarRejected, PayloadTooLarge):
        return
    note(f"members: {entries!r}")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "work"
        work.mkdir()
        safe_extract(io.BytesIO(data), work)
        assert tree(Path(scratch)) == {"work"} | {f"work/{p}" for p in tree(work)}
        for path in work.rglob("*"):
            try:
                resolved = Path(os.path.realpath(path, strict=True))
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    continue  # a link loop resolves nowhere
                resolved = Path(os.path.realpath(path))  # dangling: where it would point
            assert resolved == work.resolve() or work.resolve() in resolved.parents, path
