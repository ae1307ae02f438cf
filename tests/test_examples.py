"""The example requests in ``examples/`` (README, ``cmv-cds demo``, the preview page): each is a valid request for
its hook and answers exactly the cards its clinical content calls for.

The cards are computed on the day the example's draft was written (its ``authoredOn``), so the answer does not
depend on today's date; over HTTP only what holds on any day is checked.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from service.config import Settings
from service.fhir_client import FhirAccessPolicy
from service.hooks import run_hook, validate_request
from service.preview import example_files
from service.registry import SERVICES, ServiceDefinition

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# example → the cards (rule id, indicator, summary) in order, and the suggestions' actions. Sources: the clinical
# rules table in the README (rule precedence, docs/policy.md §9) and the label tables in cards/dosing.py.
EXPECTED: dict[str, list[tuple[str, str, str, list[list[str]]]]] = {
    # 54-year-old man, 80 kg, SCr 1.0: CrCl 96 → ganciclovir label Table 1, ≥ 70 mL/min: 5 mg/kg q12h = 400 mg.
    "order-select-ganciclovir.json": [
        (
            "dose-adjust",
            "warning",
            "Adjust ganciclovir: 400 mg IV every 12 hours (CrCl 96 mL/min)",
            [["update"]],
        ),
        # A kidney-transplant recipient on tacrolimus: reduce immunosuppression where possible (policy §15).
        (
            "reduce-immunosuppression",
            "info",
            "CMV on immunosuppressive therapy: consider reducing immunosuppression",
            [],
        ),
    ],
    # ANC 410/µL < 500 (label §5.1): ganciclovir is replaced by renally dosed foscarnet, 90 mg/kg q12h (Table 13).
    "order-select-ganciclovir-neutropenia.json": [
        (
            "myelosuppression",
            "critical",
            "Avoid ganciclovir: ANC 410 cells/µL < 500; foscarnet 5600 mg IV every 12 hours",
            [["delete", "create"]],
        ),
        (
            "reduce-immunosuppression",
            "info",
            "CMV on immunosuppressive therapy: consider reducing immunosuppression",
            [],
        ),
    ],
    # Oral valganciclovir in CMV pneumonitis: IV ganciclovir instead, and the two information cards (seeds).
    "order-select-valganciclovir-severe.json": [
        (
            "valganciclovir-to-iv",
            "warning",
            "Use IV ganciclovir 400 mg every 12 hours instead of oral valganciclovir",
            [["delete", "create"]],
        ),
        (
            "reduce-immunosuppression",
            "info",
            "Severe CMV with immunosuppression: consider reducing immunosuppression",
            [],
        ),
        ("ivig-pneumonitis", "info", "CMV pneumonitis: adjunctive IVIG may be considered", []),
    ],
    # order-sign: 67-year-old woman, 62 kg, SCr 1.6 → CrCl (140 − 67) × 62 / (72 × 1.6) × 0.85 = 33.4 mL/min.
    # Valganciclovir label Table 2, induction, CrCl 25–39: 450 mg once daily, not the 900 mg twice daily signed;
    # and mycophenolate adds myelosuppression (label §7).
    "order-sign-valganciclovir.json": [
        (
            "dose-adjust",
            "warning",
            "Adjust valganciclovir: 450 mg PO once daily (CrCl 33 mL/min)",
            [["update"]],
        ),
        ("interactions", "warning", "1 interacting medication(s) with valganciclovir: monitor CBC and creatinine", []),
        # On mycophenolate, an immunosuppressant (policy §15).
        (
            "reduce-immunosuppression",
            "info",
            "CMV on immunosuppressive therapy: consider reducing immunosuppression",
            [],
        ),
    ],
}


def load(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    return body


def service_for(body: dict[str, Any]) -> ServiceDefinition:
    return next(service for service in SERVICES.values() if service.hook == body["hook"])


def authored_on(body: dict[str, Any]) -> dt.date:
    return dt.date.fromisoformat(body["context"]["draftOrders"]["entry"][0]["resource"]["authoredOn"])


def summary(card: dict[str, Any]) -> tuple[str, str, str, list[list[str]]]:
    """(rule id, indicator, summary, action types per suggestion) of a rendered card."""
    actions = [[action["type"] for action in suggestion["actions"]] for suggestion in card.get("suggestions", [])]
    return card["source"]["topic"]["code"], card["indicator"], card["summary"], actions


def cards_on_the_day(name: str) -> list[dict[str, Any]]:
    body = load(name)
    service = service_for(body)
    validate_request(service, body)
    settings = Settings.load({"require_auth": False}, environ={})
    access = FhirAccessPolicy(prefixes=(), auth_required=False)
    return [card.to_json() for card in run_hook(service, body, settings, access, today=authored_on(body))]


def test_every_example_has_its_expected_cards() -> None:
    assert sorted(example_files(EXAMPLES)) == sorted(EXPECTED)


def test_both_hooks_have_an_example() -> None:
    assert {load(name)["hook"] for name in EXPECTED} == {service.hook for service in SERVICES.values()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_answers_its_cards(name: str) -> None:
    got = [summary(card) for card in cards_on_the_day(name)]
    assert got == EXPECTED[name]


def test_order_sign_example_proposes_the_label_dose() -> None:
    """The update keeps the signed draft's id and carries the Table 2 regimen: 450 mg by mouth once a day."""
    body = load("order-sign-valganciclovir.json")
    assert "selections" not in body["context"]  # order-sign has none (CDS Hooks hook library)
    dose_card = cards_on_the_day("order-sign-valganciclovir.json")[0]
    ((action,),) = [suggestion["actions"] for suggestion in dose_card["suggestions"]]
    resource = action["resource"]
    assert resource["id"] == body["context"]["draftOrders"]["entry"][0]["resource"]["id"] == "draft-vgc"
    (dosage,) = resource["dosageInstruction"]
    assert dosage["doseAndRate"][0]["doseQuantity"]["value"] == 450
    assert dosage["doseAndRate"][0]["doseQuantity"]["code"] == "mg"
    assert dosage["timing"]["repeat"] | {"boundsDuration": None} == {
        "frequency": 1,
        "period": 1,
        "periodUnit": "d",
        "boundsDuration": None,
    }
    assert dosage["route"]["coding"][0]["code"] == "26643006"  # oral (SNOMED CT)
    assert "CrCl (Cockcroft-Gault, actual weight, female): 33.4 mL/min" in dose_card["detail"]


def test_order_sign_example_over_http_on_any_day(client: FlaskClient) -> None:
    """Through the order-sign endpoint, on today's date: the dose and the interaction hold whatever the date (a
    stale creatinine only adds a repeat suggestion)."""
    response = client.post("/cds-services/cmv-antiviral-order-sign", json=load("order-sign-valganciclovir.json"))
    assert response.status_code == 200
    cards = response.get_json()["cards"]
    assert [card["source"]["topic"]["code"] for card in cards] == [
        "dose-adjust",
        "interactions",
        "reduce-immunosuppression",
    ]
    assert cards[0]["summary"].startswith("Adjust valganciclovir: 450 mg PO once daily (CrCl ")
    assert cards[0]["suggestions"][0]["label"] == "Update order: valganciclovir 450 mg PO once daily"
