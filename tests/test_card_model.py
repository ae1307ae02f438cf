"""The card classes (cards.model) behave as the frozen dataclasses they are declared as, though their ``__init__`` is
written out (so that, compiled, it is native): fields by position or keyword, defaults, the frozen guard, equality,
``dataclasses.replace``, and the card invariants checked at construction, for ``Card`` and Epic's ``EpicCard``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from cards.model import Action, Card, Coding, Link, Source, Suggestion
from cards.profiles import EpicCard

SOURCE = Source("Valcyte label", "https://example.org/label")
ACTION = Action("delete", "Remove the selected order", resource_id="MedicationRequest/1")
SUGGESTION = Suggestion("Remove", (ACTION,), is_recommended=True, uuid="suggestion-1")

# (class, positional arguments, the same as keywords, the fields left to their defaults and those defaults)
CASES: list[tuple[type[Any], tuple[Any, ...], dict[str, Any], dict[str, Any]]] = [
    (Coding, ("http://loinc.org", "2160-0"), {"system": "http://loinc.org", "code": "2160-0"}, {"display": None}),
    (Source, ("label",), {"label": "label"}, {"url": None}),
    (Action, ("create", "Order"), {"type": "create", "description": "Order"}, {"resource": None, "resource_id": None}),
    (Link, ("label", "https://example.org"), {"label": "label", "url": "https://example.org"}, {}),
    (Suggestion, ("Remove", (ACTION,)), {"label": "Remove", "actions": (ACTION,)}, {"is_recommended": False}),
    (
        Card,
        ("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE),
        {"rule_id": "dose-adjust", "summary": "Adjust the dose", "indicator": "warning", "detail": "detail",
         "source": SOURCE},
        {"suggestions": (), "selection_behavior": None, "links": ()},
    ),
    (
        EpicCard,
        ("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE),
        {"rule_id": "dose-adjust", "summary": "Adjust the dose", "indicator": "warning", "detail": "detail",
         "source": SOURCE},
        {"suggestions": (), "selection_behavior": None, "links": ()},
    ),
]  # fmt: skip
IDS = [case[0].__name__ for case in CASES]


def _without_ids(value: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(value).items() if k != "uuid"}


@pytest.mark.parametrize(("cls", "positional", "keywords", "defaults"), CASES, ids=IDS)
def test_fields_by_position_or_keyword_and_their_defaults(
    cls: type[Any], positional: tuple[Any, ...], keywords: dict[str, Any], defaults: dict[str, Any]
) -> None:
    by_position, by_keyword = cls(*positional), cls(**keywords)
    assert _without_ids(by_position) == _without_ids(by_keyword)
    for name, value in {**keywords, **defaults}.items():
        assert getattr(by_position, name) == value
    assert {f.name for f in dataclasses.fields(cls)} == set(keywords) | set(defaults) | (
        {"uuid"} if hasattr(by_position, "uuid") else set()
    )


@pytest.mark.parametrize(("cls", "positional", "keywords", "defaults"), CASES, ids=IDS)
def test_frozen_and_replaceable(
    cls: type[Any], positional: tuple[Any, ...], keywords: dict[str, Any], defaults: dict[str, Any]
) -> None:
    value = cls(*positional)
    name = next(iter(keywords))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, name, "changed")
    changed = dataclasses.replace(value, **{name: "changed"})
    assert type(changed) is cls
    assert getattr(changed, name) == "changed"
    assert getattr(value, name) == keywords[name]
    assert dataclasses.replace(value) == value  # the uuid too is kept


@pytest.mark.parametrize("cls", [Card, EpicCard])
def test_each_card_and_suggestion_gets_its_own_uuid_unless_given(cls: type[Card]) -> None:
    first, second = cls("rule", "summary", "info", "", SOURCE), cls("rule", "summary", "info", "", SOURCE)
    assert first.uuid != second.uuid
    assert cls("rule", "summary", "info", "", SOURCE, uuid="given").uuid == "given"
    assert Suggestion("a", ()).uuid != Suggestion("a", ()).uuid
    assert SUGGESTION.uuid == "suggestion-1"


@pytest.mark.parametrize("cls", [Card, EpicCard])
@pytest.mark.parametrize(
    ("summary", "suggestions", "behavior", "message"),
    [
        ("", (), None, "card summary must be 1-139 characters"),
        ("x" * 140, (), None, "card summary must be 1-139 characters"),
        ("summary", (SUGGESTION,), None, "has suggestions but no selectionBehavior"),
    ],
    ids=["empty-summary", "summary-140", "suggestions-without-behavior"],
)
def test_card_invariants_are_checked_at_construction(
    cls: type[Card], summary: str, suggestions: tuple[Suggestion, ...], behavior: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        cls("rule", summary, "warning", "", SOURCE, suggestions, behavior)
    assert cls("rule", "x" * 139, "warning", "", SOURCE, (SUGGESTION,), "at-most-one").summary == "x" * 139


def test_epic_card_differs_only_in_its_topic_code() -> None:
    card = EpicCard("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE, uuid="u")
    plain = Card("dose-adjust", "Adjust the dose", "warning", "detail", SOURCE, uuid="u")
    assert card.topic.code == "CmvDoseAdjust"
    assert plain.topic.code == "dose-adjust"
    assert {**card.to_json(), "source": None} == {**plain.to_json(), "source": None}
