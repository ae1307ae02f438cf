"""Replay of real client requests (tests/fixtures/ehr: Epic's published examples, the CDS Hooks sandbox's request
builder, a generic CDS Hooks 2.0 client; sources in tests/fixtures/ehr/SOURCES.md) through both client profiles.

Every request answers 200 with the cards the patient calls for, whatever shape its ids, references, doses and
search bundles take; the cds-hooks-2.0 answer is the rules' cards untouched. The epic answer's documented
constraints are checked one by one in tests/test_epic_profile.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ehr_requests import (
    PROFILES,
    REPLAYS,
    actions_of,
    answer,
    fhir_servers_answer_404,
    make_app,
    replay,
    topic,
    url_for,
)
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir_fixtures import dose_of
from flask.testing import FlaskClient

from bench import fixture
from cards.engine import selects_cmv_antiviral
from cards.model import Card
from cards.profiles import CDS_HOOKS_2, ClientProfile, epic_topic_code, shape
from service.config import Settings
from service.fhir_client import FhirAccessPolicy
from service.hooks import run_hook, validate_request
from service.registry import SERVICES
from service.validation import is_valid

GCV_MEDICATION = "eGcv2Hq7.Rt5KmWn1Zp-CytoveneIV500Vial8bQ3"
R4B: dict[str, Any] = {"MedicationRequest": MedicationRequest, "ServiceRequest": ServiceRequest}
GCV_DRAFT = "MedicationRequest/ez067mnwOAKP5z1.YJwRAsfY.5YNxZJJDzDQrJbuKBDbIp.vKaSouyn36H4Tc6-z2y9h2OU5FqxVeqUHFJRpGe4BxmHoRsVJB9GLVkHUmLPX-LyD02h3sLRMgK9uFNRU73KWgj0Tmeqi8Y.vVgy-6vka7hpwQHl1zLGD2OaLJ9rJfzfKH89zl25piLYkeGQMz3"  # noqa: E501
VGC_DRAFT = "MedicationRequest/ez067mnwOAKP5z1.YJwRAsd9gCwdOzQ8wSrsM04QFoz882hxQZKBulF4smVj2SxHWfesiTZ1qsgBez8Rdeb2GpbWYuU.L0KkOqiZSgl2GBPFYUucdOKx53adK51FHbIL.9fyjChlCongwxq0kmbsAb63ITW14qpRUnm2l2PXADxvuolXYdkN80RBgyQwLK2O33"  # noqa: E501


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, FlaskClient]]:
    directory: Path = tmp_path_factory.mktemp("replay")
    apps = {profile: make_app(directory, profile) for profile in PROFILES}
    yield {profile: app.test_client() for profile, app in apps.items()}
    for app in apps.values():
        app.extensions["cmv_cds"]["store"].dispose()


def cards_for(client: FlaskClient, name: str) -> list[dict[str, Any]]:
    status, payload = answer(client, replay(name))
    assert status == 200, payload
    assert is_valid(payload, "response.schema.json"), payload
    for card in payload["cards"]:
        for action in actions_of(card):
            if "resource" in action:
                R4B[action["resource"]["resourceType"]].model_validate(action["resource"])
    cards: list[dict[str, Any]] = payload["cards"]
    return cards


def rule_topics(cards: list[dict[str, Any]], profile: str) -> list[str]:
    """The rule ids of the cards (the epic profile writes them as CamelCase topic codes)."""
    if profile == "cds-hooks-2.0":
        return [topic(card) for card in cards]
    by_code = {epic_topic_code(rule): rule for rule in EXPECTED_RULES_ALL}
    return [by_code[topic(card)] for card in cards]


def first_dose(cards: list[dict[str, Any]], rule: str, profile: str, kind: str) -> tuple[float, int, float, str]:
    (card,) = [c for c, r in zip(cards, rule_topics(cards, profile), strict=True) if r == rule]
    resources = [a["resource"] for a in actions_of(card) if a["type"] == kind and "resource" in a]
    return dose_of(resources[0])


# fixture → (rule ids of the cards in order, check of the main card's proposal under each profile)
Check = Callable[[list[dict[str, Any]], str], None]


def _neutropenia(cards: list[dict[str, Any]], profile: str) -> None:
    """ANC 410/µL on valganciclovir → critical; foscarnet 70 mg/kg × 80 kg q12h (CrCl 1.19 mL/min/kg) = 5600 mg."""
    assert cards[0]["indicator"] == "critical"
    assert first_dose(cards, "myelosuppression", profile, "create") == (5600, 1, 12, "h")
    deletes = [a["resourceId"] for a in actions_of(cards[0]) if a["type"] == "delete"]
    assert deletes == [VGC_DRAFT]
    assert "ANC 410 cells/µL" in cards[0]["summary"]


def _gcv_iv(cards: list[dict[str, Any]], profile: str) -> None:
    """Ordered dose 500 mg (Epic extension only) vs 5 mg/kg × 80 kg = 400 mg q12h; mycophenolate, ordered by
    an absolute reference without display whose Medication came by _include, is an interaction."""
    dose_card = cards[0]
    assert "dose 500 mg (computed 400 mg)" in dose_card["detail"]
    assert "mycophenolate mofetil (CELLCEPT)" in cards[1]["detail"]
    if profile == "cds-hooks-2.0":
        (update,) = actions_of(dose_card)
        assert dose_of(update["resource"]) == (400, 1, 12, "h")
        assert update["resource"]["id"] == GCV_DRAFT.split("/", 1)[1]
        # The client's medicationReference is kept; the concept the engine read is not sent back.
        assert update["resource"]["medicationReference"] == {"reference": f"Medication/{GCV_MEDICATION}"}
        assert "medicationCodeableConcept" not in update["resource"]
    else:
        assert [(a["type"], a.get("resourceId")) for a in actions_of(dose_card)] == [("delete", GCV_DRAFT)]


def _sandbox(cards: list[dict[str, Any]], profile: str) -> None:
    """1 {pill} twice daily (no dose in mg) → 900 mg PO twice daily (CrCl 96 mL/min, label Table 2)."""
    assert "Adjust valganciclovir: 900 mg PO twice daily" in cards[0]["summary"]
    if profile == "cds-hooks-2.0":
        assert first_dose(cards, "dose-adjust", profile, "update") == (900, 2, 1, "d")


def _contained(cards: list[dict[str, Any]], profile: str) -> None:
    """Foscarnet 5000 mg q12h vs 70 mg/kg × 80 kg = 5600 mg (CrCl 1.19 mL/min/kg), from the contained Medication."""
    if profile == "cds-hooks-2.0":
        (update,) = actions_of(cards[0])
        assert dose_of(update["resource"]) == (5600, 1, 12, "h")
        assert update["resource"]["medicationReference"] == {"reference": "#med1"}
        assert update["resource"]["contained"][0]["id"] == "med1"
    else:
        assert "5600 mg" in cards[0]["summary"]


def _silent(cards: list[dict[str, Any]], profile: str) -> None:
    assert cards == []


EXPECTED: dict[str, tuple[list[str], Check]] = {
    "epic-order-select-dextromethorphan.json": ([], _silent),
    "epic-order-select-valganciclovir-neutropenia.json": (["myelosuppression", "interactions"], _neutropenia),
    # On mycophenolate: the interaction, and reducing immunosuppression where possible (docs/policy.md §15).
    "epic-order-select-ganciclovir-iv.json": (["dose-adjust", "interactions", "reduce-immunosuppression"], _gcv_iv),
    "epic-order-sign-ganciclovir-iv.json": (["dose-adjust", "interactions", "reduce-immunosuppression"], _gcv_iv),
    "sandbox-order-select-valganciclovir.json": (["dose-adjust"], _sandbox),
    "sandbox-order-sign-valganciclovir.json": (["dose-adjust"], _sandbox),
    # The transplant recipient of tests/fixtures, on tacrolimus and prednisone.
    "generic-order-select-contained-foscarnet.json": (["dose-adjust", "reduce-immunosuppression"], _contained),
}
EXPECTED_RULES_ALL = {rule for rules, _ in EXPECTED.values() for rule in rules}


def test_every_replay_fixture_has_its_expectation() -> None:
    assert sorted(EXPECTED) == REPLAYS


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", REPLAYS)
def test_replay_answers_200_with_the_right_cards(clients: dict[str, FlaskClient], name: str, profile: str) -> None:
    rules, check = EXPECTED[name]
    cards = cards_for(clients[profile], name)
    assert rule_topics(cards, profile) == rules
    check(cards, profile)


def test_epic_example_without_a_cmv_drug_reads_nothing(clients: dict[str, FlaskClient]) -> None:
    """Epic's own draftOrders example (dextromethorphan, mercaptopurine, their Medications as entries): silent,
    decided from the request alone."""
    body = replay("epic-order-select-dextromethorphan.json")
    with fhir_servers_answer_404() as mock:
        response = clients["cds-hooks-2.0"].post(url_for(body), json=body)
    assert response.get_json() == {"cards": []}
    assert len(mock.calls) == 0


def test_medications_in_the_request_need_no_fhir_read(clients: dict[str, FlaskClient]) -> None:
    """The selected draft's Medication is a draftOrders entry and the prefetched order's came by _include."""
    body = replay("epic-order-select-ganciclovir-iv.json")
    with fhir_servers_answer_404() as mock:
        response = clients["cds-hooks-2.0"].post(url_for(body), json=body)
    assert response.status_code == 200
    assert len(mock.calls) == 0


def rules_cards(body: dict[str, Any]) -> list[Card]:
    """The rules' cards for a validated request, in process, every FHIR server answering 404."""
    service = SERVICES["cmv-antiviral-order-sign" if body["hook"] == "order-sign" else "cmv-antiviral-order-select"]
    validate_request(service, body)
    settings = Settings.load({"require_auth": False}, environ={})
    with fhir_servers_answer_404():
        return run_hook(service, body, settings, FhirAccessPolicy(prefixes=(), auth_required=False))


@pytest.mark.parametrize("name", REPLAYS)
def test_default_profile_answers_the_rules_cards_untouched(name: str, tmp_path: Path) -> None:
    """cds-hooks-2.0: the answer is exactly the rules' cards (``shape`` returns them as they are)."""
    cards = rules_cards(replay(name))
    shaped = shape(cards, ClientProfile())
    assert len(shaped) == len(cards)
    assert all(a is b for a, b in zip(shaped, cards, strict=True))


# The benchmark's request (bench/fixture.py) adds what no replay has: a selected draft already in R4's shape, with a
# medicationCodeableConcept, that the service proposes to update (so the read-in-place draft is the one updated).
BENCH_REQUEST = "bench/fixture.py order-select"


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("name", [*REPLAYS, BENCH_REQUEST])
def test_a_hook_call_leaves_the_request_it_read_as_it_was(name: str, profile: str) -> None:
    """A selected draft already in R4's shape is read in place, not copied (service.draft_orders): neither the
    evaluation, nor the update actions built on it, nor the shaping for a client may change the request's data."""
    body = fixture.order_select() if name == BENCH_REQUEST else replay(name)
    before = copy.deepcopy(body)
    rendered = [card.to_json() for card in shape(rules_cards(body), ClientProfile(profile))]
    assert body == before
    if name == BENCH_REQUEST and profile == CDS_HOOKS_2:  # the draft read in place is the one the update rewrites
        entries = body["context"]["draftOrders"]["entry"]
        (draft,) = [entry["resource"] for entry in entries if entry["resource"]["id"] == "draft-gcv"]
        proposed = [
            action["resource"]
            for card in rendered
            for action in actions_of(card)
            if action.get("resource", {}).get("resourceType") == "MedicationRequest"
        ]
        assert proposed
        assert all(resource is not draft for resource in proposed)
        # 400 mg proposed for the 500 mg written
        assert any(resource["dosageInstruction"] != draft["dosageInstruction"] for resource in proposed)


def test_the_neutropenic_patient_on_valganciclovir_by_reference_is_not_silent() -> None:
    """The issue's example: the selected valganciclovir is identified only through its Medication entry."""
    body = replay("epic-order-select-valganciclovir-neutropenia.json")
    (entry,) = [e for e in body["context"]["draftOrders"]["entry"] if e["resource"]["id"] == VGC_DRAFT.split("/")[1]]
    assert "display" not in entry["resource"]["medicationReference"]
    assert "medicationCodeableConcept" not in entry["resource"]
    assert not selects_cmv_antiviral([entry["resource"]])  # what the engine would see without resolution
