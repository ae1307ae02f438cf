"""Card, suggestion and resource ids (cards.model.new_uuid): random version-4 UUIDs drawn from the CSPRNG in
batches; never repeated, also not across a fork (gunicorn's workers are forked from one master)."""

from __future__ import annotations

import os
import uuid

from cards import model


def test_ids_are_version_4_uuids_written_as_uuid4_writes_them() -> None:
    ids = [model.new_uuid() for _ in range(5 * model._IDS_PER_READ)]
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
        assert str(parsed) == text
    assert len(set(ids)) == len(ids)
    # All four variant nibbles occur: the two bits after the variant are random, as in uuid4.
    assert {text[19] for text in ids} == set("89ab")


def test_a_forked_child_never_hands_out_its_parents_ids() -> None:
    model.new_uuid()  # the pool now holds ids the parent has not handed out yet
    parents_unused = set(model._unused_ids)
    assert parents_unused
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.write(write_end, ",".join(model.new_uuid() for _ in range(3)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        childs = pipe.read().decode().split(",")
    os.waitpid(child, 0)
    assert len(childs) == 3
    assert not set(childs) & parents_unused
    assert model.new_uuid() in parents_unused  # the parent goes on with its own
