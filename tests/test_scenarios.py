"""Clinical scenarios through HTTP: one per rule, with the negative cases.

Each request is built from the fixture files (tests/fixtures) with the prefetch a conformant client
sends. Every response is checked against the response schema, and every proposed resource is
validated as FHIR R4 with the fhir.resources R4B models.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest
from fhir_fixtures import (
    condition,
    day,
    dose_of,
    load,
    observation,
    order_select,
    patient_data,
    prefetch_for,
)
from fhir_fixtures import ganciclovir_draft as gcv_draft
from fhir_fixtures import medication_order as med
from flask.testing import FlaskClient

from service.validation import is_valid

URL = "/cds-services/cmv-antiviral-order-select"
TODAY = dt.date.today()
R4B_MODELS: dict[str, Any] = {"MedicationRequest": MedicationRequest, "ServiceRequest": ServiceRequest}


def call(
    client: FlaskClient, drafts: list[dict[str, Any]], resources: list[dict[str, Any]], **kw: Any
) -> list[dict[str, Any]]:
    """POST the request; check status, response schema, and every proposed resource as FHIR R4."""
    body = order_select(drafts, prefetch=prefetch_for(resources), **kw)
    response = client.post(kw.get("url", URL) if "url" in kw else URL, json=body)
    assert response.status_code == 200, response.get_json()
    payload = response.get_json()
    assert is_valid(payload, "response.schema.json")
    for card in payload["cards"]:
        for suggestion in card.get("suggestions", []):
            for action in suggestion.get("actions", []):
                resource = action.get("resource")
                if resource:
                    R4B_MODELS[resource["resourceType"]].model_validate(resource)
                    assert resource["subject"] == {"reference": "Patient/pat-cmv-1"}
    cards: list[dict[str, Any]] = payload["cards"]
    return cards


def topic(card: dict[str, Any]) -> str:
    return str(card["source"]["topic"]["code"])


def one(cards: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    found = [c for c in cards if topic(c) == rule]
    assert len(found) == 1, [topic(c) for c in cards]
    return found[0]


def actions(card: dict[str, Any], index: int = 0) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = card["suggestions"][index]["actions"]
    return result


def drug_text(resource: dict[str, Any]) -> str:
    return str(resource["medicationCodeableConcept"]["text"]).lower()


# --- dose check and silence ---------------------------------------------------------------------------------


def test_dose_adjusted_for_weight_and_renal_function(client: FlaskClient) -> None:
    """54 y male, 80 kg, SCr 1.0 → CrCl 95.6 mL/min → 5 mg/kg q12h = 400 mg (docs/clinical-basis.md §2.2)."""
    cards = call(client, [gcv_draft(500)], patient_data())
    card = one(cards, "dose-adjust")
    assert card["indicator"] == "warning"
    (update,) = actions(card)
    assert update["type"] == "update"
    assert update["resource"]["id"] == "draft-gcv"
    assert dose_of(update["resource"]) == (400, 1, 12, "h")
    assert update["resource"]["dosageInstruction"][0]["timing"]["repeat"]["boundsDuration"]["value"] == 21
    assert update["resource"]["medicationCodeableConcept"]["coding"][0]["code"] == "310442"  # the clinician's product
    assert "CrCl" in card["detail"]
    assert "Observation/obs-scr" in card["detail"]
    assert "Observation/obs-weight" in card["detail"]
    assert card["source"]["url"].startswith("https://dailymed.nlm.nih.gov/")
    assert card["overrideReasons"]


def test_matching_order_gets_only_the_monitoring_card(client: FlaskClient) -> None:
    """docs/policy.md §12: no dosing card; one info card with weekly PCR and twice-weekly CBC ServiceRequests."""
    cards = call(client, [gcv_draft(400)], patient_data(drop=("cond-ktx", "med-tacrolimus", "med-pred")))
    assert [topic(c) for c in cards] == ["dose-confirmed-monitoring"]
    card = cards[0]
    assert card["indicator"] == "info"
    assert card["selectionBehavior"] == "any"
    pcr = actions(card, 0)[0]["resource"]
    assert pcr["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "72493-0",
        "display": pcr["code"]["coding"][0]["display"],
    }
    assert pcr["occurrenceTiming"]["repeat"] == {
        "frequency": 1,
        "period": 1,
        "periodUnit": "wk",
        "boundsDuration": {"value": 21, "unit": "days", "system": "http://unitsofmeasure.org", "code": "d"},
    }
    cbc_codes = [a["resource"]["code"]["coding"][0]["code"] for a in actions(card, 1)]
    assert cbc_codes == ["751-8", "777-3", "718-7"]
    assert actions(card, 1)[0]["resource"]["occurrenceTiming"]["repeat"]["frequency"] == 2


def test_silent_when_no_cmv_antiviral_is_selected(client: FlaskClient) -> None:
    amox = load("draft-amoxicillin.json")
    assert call(client, [amox, gcv_draft()], patient_data(), selections=["MedicationRequest/draft-amox"]) == []


def test_no_dose_without_weight(client: FlaskClient) -> None:
    cards = call(client, [gcv_draft()], patient_data(drop=("obs-weight",)))
    card = one(cards, "dose-missing-data")
    assert card["indicator"] == "warning"
    assert "body weight" in card["summary"]
    assert "suggestions" not in card  # weight is not a lab: nothing to order, no dose proposed


def test_no_dose_without_creatinine_and_the_lab_is_proposed(client: FlaskClient) -> None:
    cards = call(client, [gcv_draft()], patient_data(drop=("obs-scr", "obs-scr-old")))
    card = one(cards, "dose-missing-data")
    assert "serum creatinine" in card["summary"]
    (order,) = actions(card)
    assert order["resource"]["resourceType"] == "ServiceRequest"
    assert order["resource"]["code"]["coding"][0]["code"] == "2160-0"
    assert not any(
        a.get("resource", {}).get("resourceType") == "MedicationRequest"
        for c in cards
        for s in c.get("suggestions", [])
        for a in s["actions"]
    )


def test_unknown_creatinine_unit_is_missing_not_guessed(client: FlaskClient) -> None:
    weird = observation("obs-scr-mmol", "2160-0", 0.09, "mmol/L", 0)
    cards = call(client, [gcv_draft()], patient_data(add=(weird,)))
    card = one(cards, "dose-missing-data")
    assert "mmol/L" in card["detail"]


def test_stale_creatinine_is_used_flagged_and_a_repeat_proposed(client: FlaskClient) -> None:
    """docs/policy.md §2: SCr older than 7 days → used, the card shows its date, a repeat is suggested."""
    stale = observation("obs-scr-stale", "2160-0", 1.0, "mg/dL", 9)
    cards = call(client, [gcv_draft()], patient_data(drop=("obs-scr", "obs-scr-old"), add=(stale,)))
    card = one(cards, "dose-adjust")
    assert "STALE" in card["detail"]
    assert day(9) in card["detail"]
    labels = [s["label"] for s in card["suggestions"]]
    assert any(label.startswith("Repeat serum creatinine") for label in labels)
    assert dose_of(actions(card)[0]["resource"])[0] == 400


def test_under_18_gets_one_info_card_and_no_dose(client: FlaskClient) -> None:
    birth = (TODAY - dt.timedelta(days=30)).replace(year=TODAY.year - 15).isoformat()
    cards = call(client, [gcv_draft()], patient_data(birthDate=birth))
    assert [topic(c) for c in cards] == ["pediatric"]
    assert cards[0]["indicator"] == "info"
    assert "suggestions" not in cards[0]


# --- steering -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ((condition("cond-severe", "CMV disease", snomed="28944009", severe=True),), "severe"),
        ((observation("obs-vl-high", "72493-0", 250000, "[IU]/mL", 0),), "viral load"),
        ((condition("cond-pneu", "CMV pneumonitis"),), "pneumonitis"),
        ((condition("cond-npo", "Postoperative ileus, NPO"),), "absorption"),
    ],
)
def test_oral_valganciclovir_steered_to_iv_ganciclovir(
    client: FlaskClient, extra: tuple[dict[str, Any], ...], reason: str
) -> None:
    """docs/policy.md §9: no oral valganciclovir as initial therapy → IV ganciclovir, renally dosed."""
    cards = call(client, [load("draft-valganciclovir.json")], patient_data(add=extra))
    card = one(cards, "valganciclovir-to-iv")
    assert card["indicator"] == "warning"
    assert reason in card["detail"]
    delete, create = actions(card)
    assert (delete["type"], delete["resourceId"]) == ("delete", "MedicationRequest/draft-vgc")
    assert create["type"] == "create"
    assert drug_text(create["resource"]) == "ganciclovir"
    assert dose_of(create["resource"]) == (400, 1, 12, "h")
    proposed_drugs = [
        drug_text(a["resource"])
        for c in cards
        for s in c.get("suggestions", [])
        for a in s["actions"]
        if a.get("resource", {}).get("resourceType") == "MedicationRequest"
    ]
    assert "valganciclovir" not in proposed_drugs


def test_valganciclovir_in_dialysis_goes_to_the_hemodialysis_ganciclovir_row(client: FlaskClient) -> None:
    """docs/clinical-basis.md §3.2: valganciclovir not for HD; ganciclovir 1.25 mg/kg 3×/week after HD = 100 mg."""
    hd = condition("cond-hd", "ESRD on hemodialysis", snomed="105502003")
    cards = call(client, [load("draft-valganciclovir.json")], patient_data(add=(hd,)))
    card = one(cards, "valganciclovir-not-recommended")
    assert card["indicator"] == "critical"
    create = actions(card)[1]["resource"]
    assert dose_of(create) == (100, 3, 1, "wk")


def test_myelosuppression_is_critical_and_proposes_foscarnet(client: FlaskClient) -> None:
    """ANC 400 < 500/µL → avoid ganciclovir; foscarnet 90-column, CrCl 1.19 mL/min/kg → 70 mg/kg q12h = 5600 mg."""
    low_anc = observation("obs-anc-low", "751-8", 400, "/uL", 0)
    cards = call(client, [gcv_draft()], patient_data(drop=("obs-anc",), add=(low_anc,)))
    card = one(cards, "myelosuppression")
    assert card["indicator"] == "critical"
    assert cards[0] is card
    delete, create = actions(card)
    assert delete["resourceId"] == "MedicationRequest/draft-gcv"
    assert drug_text(create["resource"]) == "foscarnet"
    assert dose_of(create["resource"]) == (5600, 1, 12, "h")
    assert "dose-adjust" not in [topic(c) for c in cards]
    assert "**Proposed instead:** foscarnet 5600 mg IV every 12 hours" in card["detail"]
    assert "**Computation**" in card["detail"]
    assert "Hydration (label): 750–1000 mL normal saline" in card["detail"]  # docs/clinical-basis.md §4.3


@pytest.mark.parametrize(("loinc", "value", "unit"), [("777-3", 20, "10*3/uL"), ("718-7", 7.5, "g/dL")])
def test_platelet_and_hemoglobin_thresholds(client: FlaskClient, loinc: str, value: float, unit: str) -> None:
    low = observation("obs-low", loinc, value, unit, 0)
    drop = {"777-3": "obs-plt", "718-7": "obs-hgb"}[loinc]
    cards = call(client, [gcv_draft()], patient_data(drop=(drop,), add=(low,)))
    assert one(cards, "myelosuppression")["indicator"] == "critical"


def test_counts_at_the_threshold_are_not_myelosuppression(client: FlaskClient) -> None:
    edge = (
        observation("a", "751-8", 500, "/uL", 0),
        observation("p", "777-3", 25000, "/uL", 0),
        observation("h", "718-7", 8.0, "g/dL", 0),
    )
    cards = call(client, [gcv_draft()], patient_data(drop=("obs-anc", "obs-plt", "obs-hgb"), add=edge))
    assert "myelosuppression" not in [topic(c) for c in cards]


def test_cns_disease_proposes_ganciclovir_plus_foscarnet(client: FlaskClient) -> None:
    cards = call(client, [gcv_draft()], patient_data(add=(condition("cond-cns", "CMV encephalitis"),)))
    card = one(cards, "cns-combination")
    kinds = [(a["type"], drug_text(a["resource"])) for a in actions(card)]
    assert kinds == [("update", "ganciclovir 500 mg injection"), ("create", "foscarnet")]
    assert dose_of(actions(card)[0]["resource"]) == (400, 1, 12, "h")


def test_cns_with_both_drugs_selected_checks_each_dose_instead(client: FlaskClient) -> None:
    fos = load("draft-foscarnet.json")
    cards = call(
        client,
        [gcv_draft(), fos],
        patient_data(add=(condition("cond-cns", "CMV encephalitis"),)),
        selections=["MedicationRequest/draft-gcv", "MedicationRequest/draft-fos"],
    )
    assert "cns-combination" not in [topic(c) for c in cards]
    assert sorted(drug_text(actions(c)[0]["resource"]) for c in cards if topic(c) == "dose-adjust") == [
        "foscarnet 24 mg/ml",
        "ganciclovir 500 mg injection",
    ]


def test_suspected_resistance_by_viral_load_kinetics(client: FlaskClient) -> None:
    """On IV ganciclovir for 20 days; viral load 5,000 at start, 24,500 now → genotype + foscarnet."""
    extra = (
        med("med-gcv", "ganciclovir 400 mg IV q12h", 20, route="IV"),
        observation("obs-vl-0", "72493-0", 5000, "[IU]/mL", 21),
    )
    cards = call(client, [gcv_draft()], patient_data(add=extra))
    card = one(cards, "resistance")
    assert card["selectionBehavior"] == "at-most-one"
    types = [(a["type"], a.get("resource", {}).get("resourceType")) for a in actions(card)]
    assert types == [("delete", None), ("create", "MedicationRequest"), ("create", "ServiceRequest")]
    assert "UL97" in actions(card)[2]["resource"]["code"]["text"]
    assert [a["type"] for a in actions(card, 1)] == ["create"]  # genotype testing only
    assert "**Proposed:** genotypic resistance testing and foscarnet" in card["detail"]
    assert "Hydration (label): 750–1000 mL normal saline" in card["detail"]  # docs/clinical-basis.md §4.3


def test_resistance_by_reported_mutation(client: FlaskClient) -> None:
    """A UL97 mutation on the problem list. (Genotype Observations have no LOINC code in the reference, so the
    prefetch cannot ask for them; a resistance diagnosis reaches the service through the conditions key.)"""
    resistant = condition("cond-res", "Ganciclovir-resistant CMV infection (UL97 M460V)")
    cards = call(client, [gcv_draft()], patient_data(add=(resistant,)))
    assert "ganciclovir-resistant cmv" in one(cards, "resistance")["detail"].lower()


def test_falling_viral_load_is_not_resistance(client: FlaskClient) -> None:
    extra = (med("med-gcv", "ganciclovir IV", 20, route="IV"), observation("obs-vl-0", "72493-0", 90000, "[IU]/mL", 21))
    cards = call(client, [gcv_draft()], patient_data(add=extra))
    assert "resistance" not in [topic(c) for c in cards]


# --- foscarnet and cidofovir ---------------------------------------------------------------------------------


def test_foscarnet_dose_with_hydration(client: FlaskClient) -> None:
    cards = call(client, [load("draft-foscarnet.json")], patient_data())
    card = one(cards, "dose-adjust")
    assert dose_of(actions(card)[0]["resource"]) == (5600, 1, 12, "h")
    assert "750–1000 mL" in card["detail"]
    assert "equivalent to 60 mg/kg q8h" in card["detail"]  # the other label column is named with its dose


def test_foscarnet_below_0_4_ml_min_kg_is_not_recommended(client: FlaskClient) -> None:
    """SCr 3.2 → (140−54)/(72×3.2) = 0.37 mL/min/kg < 0.4 → critical, no foscarnet proposed."""
    high = observation("obs-scr-high", "2160-0", 3.2, "mg/dL", 0)
    cards = call(client, [load("draft-foscarnet.json")], patient_data(drop=("obs-scr",), add=(high,)))
    card = one(cards, "foscarnet-not-recommended")
    assert card["indicator"] == "critical"
    assert [a["type"] for a in actions(card)] == ["delete"]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"scr": 1.6}, "serum creatinine 1.60 mg/dL > 1.5"),
        ({"protein": 150}, "urine protein 150 mg/dL ≥ 100"),
        ({"weight": 40.0}, "CrCl"),  # 86×40/72 = 47.8 ≤ 55
        ({"nephrotoxic": True}, "nephrotoxic agent"),
    ],
)
def test_cidofovir_contraindications(client: FlaskClient, change: dict[str, Any], reason: str) -> None:
    scr = observation("obs-scr-c", "2160-0", change.get("scr", 1.0), "mg/dL", 0)
    protein = observation("obs-up", "2888-6", change.get("protein", 20), "mg/dL", 0)
    weight = observation("obs-w", "29463-7", change.get("weight", 80.0), "kg", 0)
    extra: list[dict[str, Any]] = [scr, protein, weight]
    if change.get("nephrotoxic"):
        extra.append(
            med("med-vanc", "vancomycin 1 g IV", 10, route="IV", status="stopped")
            | {"dosageInstruction": [{"timing": {"repeat": {"boundsPeriod": {"start": day(10), "end": day(3)}}}}]}
        )
    cards = call(client, [load("draft-cidofovir.json")], patient_data(drop=("obs-scr", "obs-weight"), add=tuple(extra)))
    card = one(cards, "cidofovir-contraindicated")
    assert card["indicator"] == "critical"
    assert reason in card["detail"]
    created = [
        a for c in cards for s in c.get("suggestions", []) for a in s["actions"] if a["type"] in ("create", "update")
    ]
    assert not any(
        "cidofovir" in drug_text(a["resource"]) for a in created if a["resource"]["resourceType"] == "MedicationRequest"
    )


def test_eligible_cidofovir_comes_with_probenecid_and_saline(client: FlaskClient) -> None:
    protein = observation("obs-up", "2888-6", 20, "mg/dL", 0)
    cards = call(client, [load("draft-cidofovir.json")], patient_data(add=(protein,)))
    card = one(cards, "cidofovir-probenecid-hydration")
    probenecid, saline = (a["resource"] for a in actions(card))
    assert [d["doseAndRate"][0]["doseQuantity"]["value"] for d in probenecid["dosageInstruction"]] == [2000, 1000, 1000]
    assert saline["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"] == {
        "value": 1000,
        "unit": "mL",
        "system": "http://unitsofmeasure.org",
        "code": "mL",
    }
    # The draft (400 mg IV weekly) matches 5 mg/kg × 80 kg once weekly: monitoring card, with SCr + urine protein
    # before each dose (docs/policy.md §12).
    monitoring = one(cards, "dose-confirmed-monitoring")
    codes = [[a["resource"]["code"]["coding"][0]["code"] for a in s["actions"]] for s in monitoring["suggestions"]]
    assert ["2160-0", "2888-6"] in codes


# --- step-down, pregnancy, interactions, adjunctive care ------------------------------------------------------


def test_iv_to_oral_step_down_offered(client: FlaskClient) -> None:
    """≥ 3 days of IV ganciclovir, viral load falling, no steer reason → valganciclovir 900 mg BID offered."""
    extra = (med("med-gcv", "ganciclovir IV", 5, route="IV"), observation("obs-vl-3", "72493-0", 3000, "[IU]/mL", 1))
    cards = call(client, [gcv_draft(400)], patient_data(drop=("obs-vl-2",), add=extra))
    card = one(cards, "iv-to-oral-step-down")
    assert card["indicator"] == "info"
    assert card["suggestions"][0]["isRecommended"] is False
    create = actions(card)[1]["resource"]
    assert drug_text(create) == "valganciclovir"
    assert dose_of(create) == (900, 2, 1, "d")


def test_no_step_down_when_viral_load_rises(client: FlaskClient) -> None:
    cards = call(client, [gcv_draft(400)], patient_data(add=(med("med-gcv", "ganciclovir IV", 5, route="IV"),)))
    assert "iv-to-oral-step-down" not in [topic(c) for c in cards]


def test_pregnancy_is_critical_with_contraception_periods(client: FlaskClient) -> None:
    hcg = observation("obs-hcg", "2106-3", None, "", 3, valueCodeableConcept={"text": "Positive"})
    cards = call(client, [gcv_draft()], patient_data(add=(hcg,), gender="female"))
    card = one(cards, "pregnancy")
    assert card["indicator"] == "critical"
    assert "30 days" in card["detail"]
    assert "90 days" in card["detail"]
    # female CrCl 0.85 × 95.6 = 81.2 → still 5 mg/kg
    assert dose_of(actions(one(cards, "dose-adjust"))[0]["resource"])[0] == 400


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("imipenem-cilastatin 500 mg IV", "seizure"),
        ("mycophenolate mofetil 1 g", "interacting"),
        ("zidovudine 300 mg", "interacting"),
    ],
)
def test_interactions(client: FlaskClient, text: str, expected: str) -> None:
    cards = call(client, [gcv_draft()], patient_data(add=(med("med-x", text, 2),)))
    card = one(cards, "interactions")
    assert card["indicator"] == "warning"
    assert expected in card["summary"].lower()
    assert "suggestions" not in card


def test_adjunctive_information_cards(client: FlaskClient) -> None:
    extra = (
        condition("cond-pneu", "CMV pneumonitis", severe=True),
        condition("cond-ret", "CMV retinitis"),
        condition("cond-hiv", "HIV infection", snomed="86406008"),
    )
    cards = call(client, [gcv_draft()], patient_data(add=extra))
    for rule in ("reduce-immunosuppression", "art-hiv", "ivig-pneumonitis", "ophthalmology-retinitis"):
        card = one(cards, rule)
        assert card["indicator"] == "info"
        assert "suggestions" not in card  # information only, no automatic orders
    assert "3 to 5 doses" in one(cards, "ivig-pneumonitis")["detail"]


def test_colitis_course_is_21_to_28_days(client: FlaskClient) -> None:
    cards = call(client, [gcv_draft()], patient_data(add=(condition("cond-col", "CMV colitis"),)))
    text = actions(one(cards, "dose-adjust"))[0]["resource"]["dosageInstruction"][0]["text"]
    assert "21–28 days" in text
    assert "until CMV DNA is undetectable" in text


def test_order_sign_runs_the_same_checks(client: FlaskClient) -> None:
    body = order_select([gcv_draft()], prefetch=prefetch_for(patient_data()), hook="order-sign")
    response = client.post("/cds-services/cmv-antiviral-order-sign", json=body)
    assert response.status_code == 200
    (card,) = [c for c in response.get_json()["cards"] if c["source"]["topic"]["code"] == "dose-adjust"]
    assert dose_of(card["suggestions"][0]["actions"][0]["resource"]) == (400, 1, 12, "h")


def test_sandbox_style_draft_is_accepted(client: FlaskClient) -> None:
    """The CDS Hooks sandbox sends category/reasonCode as objects and no Bundle type."""
    order = gcv_draft()
    order["category"] = {"text": "inpatient"}
    order["reasonCode"] = {"text": "CMV"}
    body = order_select([order], prefetch=prefetch_for(patient_data()))
    del body["context"]["draftOrders"]["type"]
    response = client.post(URL, json=body)
    assert response.status_code == 200
    update = response.get_json()["cards"][0]["suggestions"][0]["actions"][0]["resource"]
    MedicationRequest.model_validate(update)
    assert isinstance(update["category"], list)
