"""The grammar of a container image reference, as Docker's distribution/reference has it.

``[domain[:port]/]path[:tag][@algorithm:hex]``, lower-case path components joined by
``.``, ``_``, ``__`` or dashes, at most 255 characters of name. A request's
``docker_image`` and every image setting are checked against it, so a malformed
reference is refused as bad input (``invalid_image``) instead of failing in the engine.
"""

from __future__ import annotations

import re

__all__ = ["MAX_NAME_LENGTH", "is_valid_reference"]

MAX_NAME_LENGTH = 255

_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|-+)"
_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_NAME = rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_REFERENCE = re.compile(rf"(?P<name>{_NAME})(?::{_TAG})?(?:@(?P<digest>{_DIGEST}))?", re.ASCII)
#: Digest algorithms whose length is fixed, as the registry checks it.
_DIGEST_HEX = {"sha256": 64, "sha384": 96, "sha512": 128}


def is_valid_reference(reference: str) -> bool:
    """Whether ``reference`` is a well-formed image reference (``python:3.12-slim``,
    ``registry:5000/team/img@sha256:<64 hex>``)."""
    match = _REFERENCE.fullmatch(reference)
    if match is None or len(match["name"]) > MAX_NAME_LENGTH:
        return False
    if match["digest"]:
        algorithm, _, hex_part = match["digest"].partition(":")
        expected = _DIGEST_HEX.get(algorithm)
        if expected is not None and len(hex_part) != expected:
            return False
    return True
