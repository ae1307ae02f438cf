"""Card, suggestion and resource ids (cards.model.new_uuid): random version-4 UUIDs drawn from the CSPRNG in
batches; never repeated, also not across a fork (gunicorn's workers are forked from one master). Card uuids
(cards.model.new_card_uuid) are version-7 UUIDs: the time in milliseconds, then random bits."""

from __future__ import annotations

import os
import time
import uuid

from cards import model
from cards.model import Card, Source, Suggestion


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
    # A fresh read, so the pool now holds ids the parent has not handed out yet: whatever earlier tests drew in this
    # process, one draw from an emptied pool leaves _IDS_PER_READ - 1 (a pool that held exactly one would be empty).
    model._unused_ids.clear()
    model.new_uuid()
    parents_unused = set(model._unused_ids)
    assert len(parents_unused) == model._IDS_PER_READ - 1
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


def _millis(card_uuid: str) -> int:
    return int(card_uuid.replace("-", "")[:12], 16)


def test_card_uuids_are_version_7_uuids_of_the_moment_they_are_made() -> None:
    before = time.time_ns() // 1_000_000
    ids = [model.new_card_uuid() for _ in range(3 * model._IDS_PER_READ)]
    after = time.time_ns() // 1_000_000
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
        assert str(parsed) == text
        assert before <= _millis(text) <= after
    assert len(set(ids)) == len(ids)
    # 74 random bits each: the 12 after the version and the 62 after the variant (all four variant nibbles occur).
    assert len({text[15:] for text in ids}) == len(ids)
    assert {text[19] for text in ids} == set("89ab")


def test_card_uuids_sort_in_the_order_cards_were_made() -> None:
    first = model.new_card_uuid()
    started = time.monotonic()
    while _millis(second := model.new_card_uuid()) == _millis(first):
        assert time.monotonic() - started < 5, "the clock did not move"
    assert first < second  # the issued-card index grows at its end


def test_a_card_gets_a_version_7_uuid_and_its_suggestions_version_4() -> None:
    card = Card(
        "info-rule",
        "summary",
        "info",
        "detail",
        Source("label"),
        suggestions=(Suggestion("do it", ()),),
        selection_behavior="at-most-one",
    )
    assert uuid.UUID(card.uuid).version == 7
    assert uuid.UUID(card.suggestions[0].uuid).version == 4
