"""Execution ids: ``exe_`` plus a UUIDv7, so they sort by creation and keep their old shape."""

from __future__ import annotations

import uuid

from pyexec.models import EXECUTION_ID, new_execution_id


def test_ids_created_in_sequence_sort_in_sequence() -> None:
    """Ids made one after another sort in that order, also within one millisecond."""
    ids = [new_execution_id() for _ in range(20_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_keep_the_shape_clients_know() -> None:
    """A new id is ``exe_`` and a canonical UUID (version 7, RFC variant), as long as before."""
    new = new_execution_id()
    assert EXECUTION_ID.match(new)
    parsed = uuid.UUID(new.removeprefix("exe_"))
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert len(new) == len(f"exe_{uuid.uuid4()}")


def test_ids_of_earlier_versions_are_still_accepted() -> None:
    """The random UUIDv4 ids that earlier versions made still match the id pattern."""
    assert EXECUTION_ID.match(f"exe_{uuid.uuid4()}")
