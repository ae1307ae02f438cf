"""End to end against a real FHIR server (Medplum's in-memory router, tests/fhir_server), through the Flask app.

The app runs with auth off, so a plain-http loopback ``fhirServer`` is allowed (service/fhir_client.py
FhirAccessPolicy). The server is seeded with the fixture patient (tests/fixtures/adult-transplant-cmv.json)
and requires a bearer token, as an EHR's FHIR server would.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from fhir_fixtures import PATIENT_ID, dose_of, load, order_select, patient_resources, prefetch_for
from fhir_server_fixture import FhirTestServer
from fhir_server_fixture import fhir_server as fhir_server  # the module-scoped fixture
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.registry import prefetch_templates
from service.validation import is_valid

pytestmark = pytest.mark.fhirserver

URL = "/cds-services/cmv-antiviral-order-select"
TODAY = dt.date.today()
# ganciclovir for the fixture patient: 54 y male, 80 kg, SCr 1.0 → CrCl 95.6 mL/min → 5 mg/kg q12h = 400 mg IV.
EXPECTED_DOSE = (400, 1, 12, "h")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    """conftest's app (auth off, so plain-http loopback fhirServer is allowed) with generous FHIR timeouts.

    Medplum's in-memory search evaluates every stored resource of the type (about 1-2 ms each per search on
    this machine, 0.6 s for the labs search once the paging test has added its Observations, and the
    parallel fetches queue up in one Node thread); the production defaults (3 s per call, 8 s per request)
    would make these tests flaky on a slow CI runner. Timeouts themselves are tested in test_protocol.py.
    """
    application = create_app(
        {
            "require_auth": False,
            "database_url": f"sqlite:///{tmp_path / 'feedback.sqlite3'}",
            "fhir_timeout_seconds": 20,
            "fhir_deadline_seconds": 40,
        }
    )
    yield application
    application.extensions["cmv_cds"]["store"].dispose()


def fhir_authorization(token: str) -> dict[str, Any]:
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Patient.read patient/Observation.read patient/Condition.read patient/MedicationRequest.read",
        "subject": "cmv-cds",
    }


def gcv_draft(patient_id: str = PATIENT_ID) -> dict[str, Any]:
    draft: dict[str, Any] = load("draft-ganciclovir.json")  # 500 mg IV q12h: the dose-adjust case
    draft["subject"] = {"reference": f"Patient/{patient_id}"}
    return draft


def post(client: FlaskClient, body: dict[str, Any]) -> tuple[int, Any]:
    response = client.post(URL, json=body)
    return response.status_code, response.get_json()


def cards_of(client: FlaskClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    status, payload = post(client, body)
    assert status == 200, payload
    assert is_valid(payload, "response.schema.json")
    cards: list[dict[str, Any]] = payload["cards"]
    return cards


def without_uuids(value: Any) -> Any:
    """A card list with its random uuids (card, suggestion, created resource ids) blanked out."""
    if isinstance(value, dict):
        return {
            key: "<uuid>" if key == "uuid" or (key == "id" and value.get("resourceType")) else without_uuids(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [without_uuids(item) for item in value]
    return value


def topics(cards: list[dict[str, Any]]) -> list[str]:
    return [str(card["source"]["topic"]["code"]) for card in cards]


def one(cards: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    found = [card for card in cards if card["source"]["topic"]["code"] == rule]
    assert len(found) == 1, topics(cards)
    return found[0]


def assert_dose_card(cards: list[dict[str, Any]]) -> None:
    card = one(cards, "dose-adjust")
    (action,) = card["suggestions"][0]["actions"]
    assert action["type"] == "update"
    assert action["resource"]["id"] == "draft-gcv"
    assert dose_of(action["resource"]) == EXPECTED_DOSE
    assert "(Observation/obs-scr;" in card["detail"]
    assert "(Observation/obs-weight;" in card["detail"]


@pytest.fixture(scope="module")
def full_prefetch_cards() -> list[dict[str, Any]]:
    """The cards for the fixture patient when the client sends every prefetch key (no FHIR server)."""
    app = create_app({"require_auth": False, "database_url": "sqlite://"})
    try:
        cards = cards_of(app.test_client(), order_select([gcv_draft()], prefetch=prefetch_for(patient_resources())))
    finally:
        app.extensions["cmv_cds"]["store"].dispose()
    assert_dose_card(cards)
    return cards


# --- no prefetch: the service fetches everything over real HTTP with the bearer token ----------------------------


def test_no_prefetch_fetches_all_keys_from_the_fhir_server(
    client: FlaskClient, fhir_server: FhirTestServer, full_prefetch_cards: list[dict[str, Any]]
) -> None:
    body = order_select(
        [gcv_draft()], fhirServer=fhir_server.base_url, fhirAuthorization=fhir_authorization(fhir_server.token)
    )
    assert "prefetch" not in body
    cards = cards_of(client, body)
    assert_dose_card(cards)
    assert without_uuids(cards) == without_uuids(full_prefetch_cards)


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_the_fhir_server_token_is_required(client: FlaskClient, fhir_server: FhirTestServer, token: str | None) -> None:
    extra: dict[str, Any] = {"fhirServer": fhir_server.base_url}
    if token is not None:
        extra["fhirAuthorization"] = fhir_authorization(token)
    status, payload = post(client, order_select([gcv_draft()], **extra))
    assert status == 412, payload
    assert payload["resourceType"] == "OperationOutcome"
    assert "HTTP 401" in payload["issue"][0]["diagnostics"]
    # The server itself refuses the token (the 412 is not the service's own doing).
    assert fhir_server.get("metadata").status_code == 200
    headers = {"Authorization": "Bearer wrong-token"}
    assert requests.get(f"{fhir_server.base_url}/Patient/{PATIENT_ID}", headers=headers, timeout=5).status_code == 401


# --- prefetch filled by running the service's own templates against the server, as a CDS client does -------------

# What each template must return for the fixture patient (ids in tests/fixtures/adult-transplant-cmv.json).
EXPECTED_SEARCH_RESULTS = {
    "bodyMeasurements": {"obs-weight", "obs-height"},
    "labs": {"obs-scr", "obs-scr-old", "obs-anc", "obs-plt", "obs-hgb"},
    "cmvViralLoads": {"obs-vl-1", "obs-vl-2"},
    "conditions": {"cond-cmv", "cond-ktx"},
    "medications": {"med-tacrolimus", "med-pred", "med-amlodipine"},
}


def client_prefetch(server: FhirTestServer, patient_id: str, *keys: str) -> dict[str, Any]:
    """Each prefetch template (or those named), rendered and run against the FHIR server, as a CDS client does."""
    prefetch: dict[str, Any] = {}
    for template in prefetch_templates():
        if keys and template.key not in keys:
            continue
        response = server.get(template.query.replace("{{context.patientId}}", patient_id))
        assert response.status_code == 200, (template.key, response.text)
        prefetch[template.key] = response.json()
    return prefetch


def test_prefetch_templates_are_searches_a_real_server_answers(
    client: FlaskClient, fhir_server: FhirTestServer, full_prefetch_cards: list[dict[str, Any]]
) -> None:
    prefetch = client_prefetch(fhir_server, PATIENT_ID)

    assert prefetch["patient"]["resourceType"] == "Patient"
    assert prefetch["patient"]["id"] == PATIENT_ID
    for key, expected in EXPECTED_SEARCH_RESULTS.items():
        bundle = prefetch[key]
        assert bundle["resourceType"] == "Bundle"
        assert bundle["type"] == "searchset"
        found = {entry["resource"]["id"] for entry in bundle.get("entry", [])}
        assert found == expected, key
        assert bundle["total"] == len(expected), key
        assert not [link for link in bundle["link"] if link["relation"] == "next"], key
    # _sort=-date is honoured: the newest creatinine comes before the older one.
    lab_ids = [entry["resource"]["id"] for entry in prefetch["labs"]["entry"]]
    assert lab_ids.index("obs-scr") < lab_ids.index("obs-scr-old")

    cards = cards_of(client, order_select([gcv_draft()], prefetch=prefetch))  # no fhirServer at all
    assert_dose_card(cards)
    assert without_uuids(cards) == without_uuids(full_prefetch_cards)


def test_the_templates_do_not_match_other_patients_or_inactive_data(fhir_server: FhirTestServer) -> None:
    """A second patient's data and an inactive Condition / entered-in-error order stay out of the searches."""
    other = "pat-cmv-other"
    copies: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": other, "gender": "female", "birthDate": "1970-01-01"}
    ]
    for resource in patient_resources():
        if resource["resourceType"] != "Patient":
            copied = copy.deepcopy(resource) | {"id": f"{resource['id']}-other"}
            copied["subject"] = {"reference": f"Patient/{other}"}
            copies.append(copied)
    fhir_server.put_all(copies)
    resolved = copy.deepcopy(next(r for r in patient_resources() if r["id"] == "cond-cmv"))
    resolved["id"] = "cond-old-resolved"
    resolved["clinicalStatus"]["coding"][0]["code"] = "resolved"
    fhir_server.put(resolved)
    erroneous = copy.deepcopy(next(r for r in patient_resources() if r["id"] == "med-pred"))
    erroneous["id"] = "med-entered-in-error"
    erroneous["status"] = "entered-in-error"
    fhir_server.put(erroneous)

    prefetch = client_prefetch(fhir_server, PATIENT_ID)
    for key, expected in EXPECTED_SEARCH_RESULTS.items():
        assert {entry["resource"]["id"] for entry in prefetch[key].get("entry", [])} == expected, key
    other_labs = client_prefetch(fhir_server, other, "labs")["labs"]
    assert {entry["resource"]["id"] for entry in other_labs["entry"]} == {
        f"{oid}-other" for oid in EXPECTED_SEARCH_RESULTS["labs"]
    }


# --- paging: the service follows the server's link[next] ----------------------------------------------------------

PAGING_PATIENT = "pat-cmv-paging"
EXTRA_CREATININES = 120


def creatinine(oid: str, patient_id: str, when: str, mg_dl: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "2160-0"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when,
        "valueQuantity": {"value": mg_dl, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    }


def copy_of_fixture_patient(patient_id: str, prefix: str, drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The fixture patient's resources under another patient id (resource ids prefixed)."""
    copies = []
    for resource in patient_resources():
        if resource["id"] in drop:
            continue
        copied = copy.deepcopy(resource)
        if resource["resourceType"] == "Patient":
            copied["id"] = patient_id
        else:
            copied["id"] = f"{prefix}{resource['id']}"
            copied["subject"] = {"reference": f"Patient/{patient_id}"}
        copies.append(copied)
    return copies


def hook_call(server: FhirTestServer, patient_id: str) -> dict[str, Any]:
    """An order-select call with no prefetch: everything comes from the FHIR server."""
    body = order_select(
        [gcv_draft(patient_id)], fhirServer=server.base_url, fhirAuthorization=fhir_authorization(server.token)
    )
    body["context"]["patientId"] = patient_id
    return body


def test_service_follows_next_links_across_pages(client: FlaskClient, fhir_server: FhirTestServer) -> None:
    """120 extra creatinines push the (older) blood counts to page 2 of the labs search (``_count=100``).

    The latest creatinine (2.0 mg/dL, yesterday) is on page 1; a low ANC (400/µL) exists only on page 2.
    Following ``link[next]`` the service sees both: myelosuppression → foscarnet, dosed on the latest
    creatinine: (140 − 54) / (72 × 2.0) = 0.597 mL/min/kg → 60 mg/kg q24h × 80 kg = 4800 mg. Stopping at
    page 1 it would instead adjust ganciclovir (CrCl 47.8 mL/min → 2.5 mg/kg q24h = 200 mg).
    """
    counts_date = (TODAY - dt.timedelta(days=EXTRA_CREATININES + 5)).isoformat()  # older than every creatinine
    resources = copy_of_fixture_patient(PAGING_PATIENT, "pg-", drop=("obs-scr", "obs-scr-old"))
    for resource in resources:
        if resource["id"] in ("pg-obs-anc", "pg-obs-plt", "pg-obs-hgb"):
            resource["effectiveDateTime"] = counts_date  # stale, but used (docs/policy.md §2)
        if resource["id"] == "pg-obs-anc":
            resource["valueQuantity"] = {
                "value": 400,
                "unit": "/uL",
                "system": "http://unitsofmeasure.org",
                "code": "/uL",
            }
    for days_ago in range(1, EXTRA_CREATININES + 1):
        when = (TODAY - dt.timedelta(days=days_ago)).isoformat()
        resources.append(creatinine(f"pg-scr-{days_ago}", PAGING_PATIENT, when, 2.0 if days_ago == 1 else 1.0))
    fhir_server.put_all(resources)

    # The server really pages this search: 100 entries, the true total and a next link on its base URL.
    labs = client_prefetch(fhir_server, PAGING_PATIENT, "labs")["labs"]
    assert len(labs["entry"]) == 100
    assert labs["total"] == EXTRA_CREATININES + 3
    (next_url,) = [link["url"] for link in labs["link"] if link["relation"] == "next"]
    assert next_url.startswith(fhir_server.base_url + "/Observation?")
    page_one = [entry["resource"]["id"] for entry in labs["entry"]]
    assert page_one[0] == "pg-scr-1"
    assert "pg-obs-anc" not in page_one

    cards = cards_of(client, hook_call(fhir_server, PAGING_PATIENT))
    card = one(cards, "myelosuppression")
    assert "Observation/pg-obs-anc" in card["detail"]  # page 2
    assert "(Observation/pg-scr-1;" in card["detail"]  # the latest creatinine
    delete, create = card["suggestions"][0]["actions"]
    assert delete["resourceId"] == "MedicationRequest/draft-gcv"
    assert create["resource"]["medicationCodeableConcept"]["text"] == "foscarnet"
    assert dose_of(create["resource"]) == (4800, 1, 24, "h")


def test_two_creatinines_on_the_same_day_use_the_later_one(client: FlaskClient, fhir_server: FhirTestServer) -> None:
    """docs/policy.md §2: the most recent value by effectiveDateTime, which includes the time of day."""
    patient_id = "pat-cmv-same-day"
    yesterday = (TODAY - dt.timedelta(days=1)).isoformat()
    resources = copy_of_fixture_patient(patient_id, "sd-", drop=("obs-scr", "obs-scr-old"))
    resources += [
        creatinine("sd-scr-morning", patient_id, f"{yesterday}T06:00:00Z", 1.0),
        creatinine("sd-scr-evening", patient_id, f"{yesterday}T18:00:00Z", 2.0),  # AKI: creatinine doubling
    ]
    fhir_server.put_all(resources)
    labs = client_prefetch(fhir_server, patient_id, "labs")["labs"]
    assert [e["resource"]["id"] for e in labs["entry"]][:2] == ["sd-scr-evening", "sd-scr-morning"]

    card = one(cards_of(client, hook_call(fhir_server, patient_id)), "dose-adjust")
    assert "(Observation/sd-scr-evening;" in card["detail"]
    # CrCl (140 − 54) × 80 / (72 × 2.0) = 47.8 mL/min → 2.5 mg/kg q24h = 200 mg.
    assert dose_of(card["suggestions"][0]["actions"][0]["resource"]) == (200, 1, 24, "h")


# --- a patient the server does not have -------------------------------------------------------------------------


def test_unknown_patient_gets_the_missing_data_card_not_an_error(
    client: FlaskClient, fhir_server: FhirTestServer
) -> None:
    missing = "pat-does-not-exist"
    assert fhir_server.get(f"Patient/{missing}").status_code == 404
    cards = cards_of(client, hook_call(fhir_server, missing))
    card = one(cards, "dose-missing-data")
    assert card["summary"].startswith("Ganciclovir dose not computed: missing ")
    assert "age" in card["summary"]
    assert not [c for c in cards if c["source"]["topic"]["code"] == "dose-adjust"]
