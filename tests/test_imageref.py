"""Image references follow Docker's grammar; a malformed one is bad input, not an engine error."""

from __future__ import annotations

import pytest

from pyexec.errors import BadRequest
from pyexec.imageref import is_valid_reference
from pyexec.models import parse_request
from pyexec.settings import Settings, SettingsError

DIGEST = "sha256:" + "ab" * 32
VALID = [
    "python:3.12-slim",
    "pyexec-runner:bookworm",
    "ubuntu",
    "library/python",
    "registry.example.com/team/img:v1.2",
    "localhost:5000/a/b_c__d---e:latest",
    f"img@{DIGEST}",
    f"registry:5000/img:tag@{DIGEST}",
    "[::1]:5000/img",
]
INVALID = [
    "Bad Image!",
    "../../etc:passwd",
    "x/y@sha256:zz",
    "x/y@sha256:" + "a" * 63,
    "team/UPPER",
    "",
    "img:",
    "img:tag:again",
    "/img",
    "img/",
    "a//b",
    "img:" + "t" * 129,
    "a" * 256,
    "img\n",
    "-img",
]


@pytest.mark.parametrize("reference", VALID)
def test_well_formed_references_pass(reference: str) -> None:
    """References Docker accepts are accepted."""
    assert is_valid_reference(reference)


@pytest.mark.parametrize("reference", INVALID)
def test_malformed_references_are_refused(reference: str) -> None:
    """Anything outside the grammar is refused."""
    assert not is_valid_reference(reference)


@pytest.mark.parametrize("reference", INVALID[:3])
def test_a_request_naming_a_malformed_image_is_invalid_image(reference: str) -> None:
    """docker_image is checked at parse time: 400 invalid_image, even where any image is allowed."""
    settings = Settings(allowed_images=("*",))
    with pytest.raises(BadRequest) as info:
        parse_request({"docker_image": reference}, settings)
    assert (info.value.status_code, info.value.code) == (400, "invalid_image")


def test_an_image_outside_the_allowed_list_is_not_allowed() -> None:
    """A valid reference that is not a default or listed is 400 image_not_allowed."""
    with pytest.raises(BadRequest) as info:
        parse_request({"docker_image": "other:1"}, Settings())
    assert info.value.code == "image_not_allowed"
    assert parse_request({"docker_image": "other:1"}, Settings(allowed_images=("other:1",)))
    assert parse_request({"docker_image": "x:2"}, Settings(allowed_images=("*",)))


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PYEXEC_DEFAULT_IMAGE": "Bad Image!"}, "PYEXEC_DEFAULT_IMAGE"),
        ({"PYEXEC_ALLOWED_IMAGES": "ok:1,no way"}, "PYEXEC_ALLOWED_IMAGES"),
        ({"PYEXEC_PYTHON_IMAGES": "3.12=../x"}, "PYEXEC_PYTHON_IMAGES"),
    ],
)
def test_image_settings_are_checked_at_start(env: dict[str, str], variable: str) -> None:
    """An image setting that is no reference stops the service, naming the variable."""
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    assert variable in info.value.message
