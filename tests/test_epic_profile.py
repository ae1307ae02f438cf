"""The ``epic`` client profile against each constraint Epic documents (fhir.epic.com, CDS Hooks Tutorial), one
test per constraint, over every replay fixture (tests/fixtures/ehr) and every scenario of tests/card_corpus.py.

The rules write the cards and will change; these tests hold whatever cards come out to the constraints, by
comparing each request's ``epic`` answer with its ``cds-hooks-2.0`` answer (same engine, same order of cards).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from card_corpus import COVERED_RULES, SCENARIOS
from ehr_requests import REPLAYS, actions_of, answer, make_app, replay, topic
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir_fixtures import dose_of

from cards.codes import RXNORM
from cards.profiles import (
    CDS_HOOKS_2,
    CREATE_DEFAULTS_NOTE,
    EPIC,
    NO_UPDATE_NOTE,
    PREFERENCE_LIST_SYSTEM,
    RXNORM_OID,
    epic_topic_code,
    regimen_words,
)
from service.validation import is_valid

R4B: dict[str, Any] = {"MedicationRequest": MedicationRequest, "ServiceRequest": ServiceRequest}
CASES = [*(f"replay:{name}" for name in REPLAYS), *(f"scenario:{name}" for name in SCENARIOS)]
# Names are matched case-insensitively (the service proposes "ganciclovir").
PREFERENCE_LIST = {"foscarnet": "FOSCARNET_IV_PREF", "Ganciclovir": "GANCICLOVIR_IV_PREF"}
PREFERENCE_ITEMS = {name.lower(): code for name, code in PREFERENCE_LIST.items()}


@dataclass(frozen=True)
class Answers:
    """One request answered under both profiles, and under epic with a preference-list map."""

    default: list[dict[str, Any]]
    epic: list[dict[str, Any]]
    epic_preference_list: list[dict[str, Any]]


def _body(case: str) -> dict[str, Any]:
    kind, name = case.split(":", 1)
    return replay(name) if kind == "replay" else SCENARIOS[name]()


@pytest.fixture(scope="module")
def answers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Answers]]:
    directory: Path = tmp_path_factory.mktemp("epic-profile")
    apps = [
        make_app(directory, CDS_HOOKS_2),
        make_app(directory, EPIC),
        make_app(
            directory,
            EPIC,
            preference_list_items=json.dumps(PREFERENCE_LIST),
            database_url=f"sqlite:///{directory / 'preference-list.sqlite3'}",
        ),
    ]
    found: dict[str, Answers] = {}
    for case in CASES:
        results = []
        for app in apps:
            status, payload = answer(app.test_client(), _body(case))
            assert status == 200, (case, payload)
            assert is_valid(payload, "response.schema.json"), (case, payload)
            results.append(payload["cards"])
        found[case] = Answers(*results)
    yield found
    for app in apps:
        app.extensions["cmv_cds"]["store"].dispose()


def pairs(answers: Answers) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(cds-hooks-2.0 card, epic card) of one request, in the rules' order."""
    assert len(answers.default) == len(answers.epic)
    return list(zip(answers.default, answers.epic, strict=True))


def words_of(resource: dict[str, Any]) -> str:
    """The first dose of a proposed MedicationRequest as the rules print it in summaries: ``400 mg``."""
    value, *_ = dose_of(resource)
    return f"{value:g} {resource['dosageInstruction'][0]['doseAndRate'][0]['doseQuantity']['unit']}"


def created_medications(card: dict[str, Any]) -> list[dict[str, Any]]:
    creates = [a["resource"] for a in actions_of(card) if a["type"] == "create"]
    return [resource for resource in creates if resource["resourceType"] == "MedicationRequest"]


def dosage_words(resource: dict[str, Any]) -> list[str]:
    """How each dosage line of a proposal is named to the clinician: its dose (``400 mg``), or its text when the
    proposal has several lines (probenecid before and after each cidofovir dose)."""
    dosages = resource["dosageInstruction"]
    if len(dosages) > 1:
        return [str(dosage["text"]) for dosage in dosages]
    quantity = dosages[0]["doseAndRate"][0]["doseQuantity"]
    return [f"{quantity['value']:g} {quantity['unit']}"]


def offered(card: dict[str, Any]) -> list[tuple[str, str]]:
    """What a card's suggestions create, by kind and name (each resource once)."""
    resources = {a["resource"]["id"]: a["resource"] for a in actions_of(card) if a["type"] == "create"}
    return sorted(
        (r["resourceType"], str((r.get("medicationCodeableConcept") or r.get("code") or {}).get("text", "")))
        for r in resources.values()
    )


def test_the_corpus_makes_every_kind_of_card(answers: dict[str, Answers]) -> None:
    made = {topic(card) for case in answers.values() for card in case.default}
    assert made >= COVERED_RULES


@pytest.mark.parametrize("case", CASES)
def test_epic_answers_validate_and_propose_valid_fhir(answers: dict[str, Answers], case: str) -> None:
    for card in answers[case].epic + answers[case].epic_preference_list:
        for action in actions_of(card):
            if "resource" in action:
                R4B[action["resource"]["resourceType"]].model_validate(action["resource"])


@pytest.mark.parametrize("case", CASES)
def test_one_action_per_suggestion(answers: dict[str, Answers], case: str) -> None:
    """ "Epic only supports a single action per suggestion." (Suggestion Attributes)"""
    for card in answers[case].epic:
        for suggestion in card.get("suggestions", []):
            assert len(suggestion["actions"]) == 1, (topic(card), suggestion)


@pytest.mark.parametrize("case", CASES)
def test_actions_only_create_or_delete(answers: dict[str, Answers], case: str) -> None:
    """ "An action creates or deletes a FHIR resource." (Actions): no update, of a MedicationRequest or anything."""
    assert {a["type"] for card in answers[case].epic for a in actions_of(card)} <= {"create", "delete"}


@pytest.mark.parametrize("case", CASES)
def test_selection_behavior_is_any(answers: dict[str, Answers], case: str) -> None:
    """ "Only the value 'any' is currently supported." (Card Attributes, selectionBehavior)"""
    for card in answers[case].epic:
        assert card.get("selectionBehavior") == ("any" if card.get("suggestions") else None)


@pytest.mark.parametrize("case", CASES)
def test_topic_code_alphanumeric_at_most_100_and_one_per_rule(answers: dict[str, Answers], case: str) -> None:
    """ "Epic only supports alpha-numeric strings as the code of source.topic ... Maximum Length: 100" and it
    "should be a static identifier representing the particular topic of a card" (Card Attributes)."""
    for default, epic in pairs(answers[case]):
        assert re.fullmatch(r"[A-Za-z0-9]{1,100}", topic(epic)), topic(epic)
        assert topic(epic) == epic_topic_code(topic(default))


def test_topic_codes_tell_the_rules_apart(answers: dict[str, Answers]) -> None:
    """Static per kind of card, and two kinds never share a code (an override of one must not hide another)."""
    codes: dict[str, set[str]] = {}
    for case in answers.values():
        for default, epic in pairs(case):
            codes.setdefault(topic(epic), set()).add(topic(default))
    assert all(len(rules) == 1 for rules in codes.values()), codes


@pytest.mark.parametrize("case", CASES)
def test_medication_creates_are_coded_in_rxnorm_oid(answers: dict[str, Answers], case: str) -> None:
    """Codesets for Create APIs: RxNorm is urn:oid:2.16.840.1.113883.6.88 in a MedicationRequest create."""
    for default, epic in pairs(answers[case]):
        expected = [
            coding["code"]
            for a in actions_of(default)
            if a["type"] == "create" and a["resource"]["resourceType"] == "MedicationRequest"
            for coding in a["resource"]["medicationCodeableConcept"].get("coding", [])
            if coding["system"] == RXNORM
        ]
        creates = [r for r in created_medications(epic)]
        systems = [c["system"] for r in creates for c in r["medicationCodeableConcept"].get("coding", [])]
        assert RXNORM not in systems
        assert [c["code"] for r in creates for c in r["medicationCodeableConcept"].get("coding", [])] == expected
        assert set(systems) <= {RXNORM_OID}


@pytest.mark.parametrize("case", CASES)
def test_preference_list_items_replace_the_coding(answers: dict[str, Answers], case: str) -> None:
    """An institution's preference-list item names the order alone (system ...preference-list-item)."""
    for card in answers[case].epic_preference_list:
        for action in actions_of(card):
            resource = action.get("resource", {})
            if action["type"] != "create" or resource.get("resourceType") != "MedicationRequest":
                continue
            item = PREFERENCE_ITEMS.get(resource["medicationCodeableConcept"]["text"].lower())
            codings = resource["medicationCodeableConcept"].get("coding", [])
            if item:
                assert codings == [{"system": PREFERENCE_LIST_SYSTEM, "code": item}]
            else:
                assert all(c["system"] == RXNORM_OID for c in codings)


def test_the_preference_list_is_used_somewhere(answers: dict[str, Answers]) -> None:
    """The corpus does propose the mapped medications (foscarnet, ganciclovir), so the test above is not empty."""
    used = {
        c["code"]
        for case in answers.values()
        for card in case.epic_preference_list
        for a in actions_of(card)
        if a["type"] == "create" and a["resource"]["resourceType"] == "MedicationRequest"
        for c in a["resource"]["medicationCodeableConcept"].get("coding", [])
        if c["system"] == PREFERENCE_LIST_SYSTEM
    }
    assert used == set(PREFERENCE_LIST.values())


@pytest.mark.parametrize("case", CASES)
def test_dose_correction_is_carried_in_words(answers: dict[str, Answers], case: str) -> None:
    """No update (Actions) → the corrected dose is in the summary, the detail and an action's description
    (policy.md §9, Client profiles)."""
    for default, epic in pairs(answers[case]):
        for update in [a for a in actions_of(default) if a["type"] == "update"]:
            dose = words_of(update["resource"])
            assert dose in epic["summary"].replace(",", ""), (dose, epic["summary"])
            assert dose in epic["detail"]
            assert NO_UPDATE_NOTE in epic["detail"]
            descriptions = [a["description"] for a in actions_of(epic)]
            assert any(dose in text and NO_UPDATE_NOTE in text for text in descriptions), descriptions


@pytest.mark.parametrize("case", CASES)
def test_the_draft_can_be_removed_where_it_must_not_be_signed(answers: dict[str, Answers], case: str) -> None:
    """Every draft the rules would change or remove is offered for deletion (MedicationRequest delete is
    supported: "Medication single order follow-up suggestions with DELETE actions")."""
    for default, epic in pairs(answers[case]):
        targets = {
            a.get("resourceId") or f"{a['resource']['resourceType']}/{a['resource']['id']}"
            for a in actions_of(default)
            if a["type"] in ("update", "delete")
        }
        assert targets <= {a["resourceId"] for a in actions_of(epic) if a["type"] == "delete"}


@pytest.mark.parametrize("case", CASES)
def test_a_create_never_claims_the_computed_dose(answers: dict[str, Answers], case: str) -> None:
    """Epic places a MedicationRequest create with its own record's defaults, "NOT ... from the service
    response" (Actions): the clinician reads that, in the action and on the card, with the dose to set."""
    for card in answers[case].epic:
        creates = [a for a in actions_of(card) if a["type"] == "create" and a["resource"] in created_medications(card)]
        for action in creates:
            assert CREATE_DEFAULTS_NOTE in action["description"]
            assert "set it to" in action["description"]
            for words in dosage_words(action["resource"]):
                assert words in action["description"], (words, action["description"])
        if creates:
            assert "**Orders placed from this card** take their dose" in card["detail"]


@pytest.mark.parametrize("case", CASES)
def test_nothing_offered_by_the_rules_is_lost(answers: dict[str, Answers], case: str) -> None:
    """Every resource the rules create is still offered (once), and every card keeps its uuid-bearing
    suggestions and its override reasons (Epic needs uuids to send feedback)."""
    for default, epic in pairs(answers[case]):
        assert offered(epic) == offered(default)
        created_ids = [a["resource"]["id"] for a in actions_of(epic) if a["type"] == "create"]
        assert len(created_ids) == len(set(created_ids))
        assert epic.get("overrideReasons") == default.get("overrideReasons")
        assert all(s["uuid"] for s in epic.get("suggestions", []))


# --- the words the epic profile writes ----------------------------------------------------------------------


def _proposal(repeat: dict[str, Any], route: str = "47625008") -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "dosageInstruction": [
            {
                "timing": {"repeat": repeat},
                "route": {"coding": [{"system": "http://snomed.info/sct", "code": route}]},
                "doseAndRate": [{"doseQuantity": {"value": 400, "unit": "mg"}}],
            }
        ],
    }


@pytest.mark.parametrize(
    ("repeat", "words"),
    [
        ({"frequency": 1, "period": 12, "periodUnit": "h"}, "400 mg IV every 12 hours"),
        ({"frequency": 1, "period": 24, "periodUnit": "h"}, "400 mg IV every 24 hours"),
        ({"frequency": 1, "period": 1, "periodUnit": "d"}, "400 mg IV once daily"),
        ({"frequency": 2, "period": 1, "periodUnit": "d"}, "400 mg IV twice daily"),
        ({"frequency": 3, "period": 1, "periodUnit": "wk"}, "400 mg IV 3 times weekly"),
        ({"frequency": 1, "period": 2, "periodUnit": "wk"}, "400 mg IV every 2 weeks"),
        ({"frequency": 2, "frequencyMax": 3, "period": 1, "periodUnit": "wk"}, "400 mg IV 2–3 times weekly"),
        (
            {"frequency": 1, "period": 12, "periodUnit": "h", "boundsDuration": {"value": 21, "unit": "days"}},
            "400 mg IV every 12 hours for 21 days",
        ),
        ({"frequency": 1, "period": 1, "periodUnit": "wk", "count": 2}, "400 mg IV once weekly (2 doses)"),
    ],
)
def test_regimen_words(repeat: dict[str, Any], words: str) -> None:
    """What the clinician reads in place of an update or a create's dose (policy §8 timing, in words)."""
    assert regimen_words(_proposal(repeat)) == words


def test_oral_route_in_words() -> None:
    assert (
        regimen_words(_proposal({"frequency": 2, "period": 1, "periodUnit": "d"}, "26643006"))
        == "400 mg PO twice daily"
    )


def test_the_hemodialysis_schedule_is_in_the_structured_dosage_and_in_epics_words(
    answers: dict[str, Answers],
) -> None:
    """Dialysis: IV ganciclovir on the label's < 10 mL/min row, 3 times weekly after each hemodialysis session.
    Timing has no dialysis event, so the proposal carries it as an additional instruction, and Epic, which shows
    the action's description, names it too."""
    case = answers["scenario:valganciclovir-dialysis"]
    [default_create] = [m for card in case.default for m in created_medications(card)]
    dosage = default_create["dosageInstruction"][0]
    repeat = dosage["timing"]["repeat"]
    assert (repeat["frequency"], repeat["period"], repeat["periodUnit"]) == (3, 1, "wk")
    assert dosage["additionalInstruction"] == [{"text": "after each hemodialysis session"}]
    MedicationRequest.model_validate(default_create)
    descriptions = [a["description"] for card in case.epic for a in actions_of(card) if a["type"] == "create"]
    assert any("3 times weekly for 21 days (after each hemodialysis session)" in d for d in descriptions), descriptions
