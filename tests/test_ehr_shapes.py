"""What real EHRs send, read at the service edge: long opaque ids (held to a URL-safe set), medications by
reference (contained, a draftOrders or prefetch entry, a read from fhirServer, the display), Epic's and the
pre-R4 dose shapes, absolute references, Epic's "no results" Bundles and its request ``extension``.

Sources of each shape: tests/fixtures/ehr/SOURCES.md.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import responses
from fhir_fixtures import (
    PATIENT_ID,
    by_reference,
    load,
    medication_order,
    order_select,
    patient_resources,
    prefetch_for,
)
from fhir_fixtures import ganciclovir_draft as gcv_draft
from flask.testing import FlaskClient
from test_fhir_server_integration import fhir_authorization

from service import medication_refs
from service.draft_orders import EPIC_ORDERED_DOSE, normalise_medication_request, reference_parts

URL = "/cds-services/cmv-antiviral-order-select"
FHIR = "https://ehr.example.org/fhir/R4"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
GANCICLOVIR = {"coding": [{"system": RXNORM, "code": "310442"}], "text": "ganciclovir 500 mg vial"}
# A Medication id in Epic's style and length (fhir.epic.com, CDS Hooks Tutorial, "Example HTTP Request").
EPIC_MEDICATION_ID = (
    "ehjM3OtjgdW8Bea3jIQgMFVhzPMcMELCBS5v775xzbLetNaOP5vZRG-7BUwFy1hYFzJ7rXwELBf63P6zbB4tI56DXbUTYtEZEWyFIzxmyONE3"
)
REFERENCE_PATH = "context.draftOrders.entry[0].resource.medicationReference"


def mg(value: float) -> dict[str, Any]:
    return {"value": value, "unit": "mg", "system": UCUM, "code": "mg"}


def medication(ident: str, concept: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"resourceType": "Medication", "id": ident, "code": concept or GANCICLOVIR}


def request(
    drafts: list[dict[str, Any]],
    *,
    extra_entries: list[dict[str, Any]] = (),  # type: ignore[assignment]
    resources: list[dict[str, Any]] | None = None,
    with_server: bool = False,
) -> dict[str, Any]:
    body = order_select(drafts, prefetch=prefetch_for(resources or patient_resources()))
    body["context"]["draftOrders"]["entry"] += [{"resource": r} for r in extra_entries]
    if with_server:
        body |= {"fhirServer": FHIR, "fhirAuthorization": fhir_authorization("token-1")}
    return body


def post(client: FlaskClient, body: dict[str, Any]) -> tuple[int, Any]:
    response = client.post(URL, json=body)
    return response.status_code, response.get_json()


# The fixture patient is a kidney-transplant recipient on tacrolimus: every answer also carries the information
# card on reducing immunosuppression (docs/policy.md §15, tested in test_protocol); these tests are about the
# card for the selected order.
FIXTURE_INFO_CARD = "reduce-immunosuppression"


def topics(payload: dict[str, Any]) -> list[str]:
    return [
        card["source"]["topic"]["code"]
        for card in payload["cards"]
        if card["source"]["topic"]["code"] != FIXTURE_INFO_CARD
    ]


def dose_detail(payload: dict[str, Any]) -> str:
    (card,) = [
        c for c in payload["cards"] if c["source"]["topic"]["code"] in ("dose-adjust", "dose-confirmed-monitoring")
    ]
    return str(card["detail"])


@pytest.fixture
def rsps() -> Any:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


# --------------------------------------------------------------------------------------------------
# Ids: Epic's length, held to what is safe in a FHIR URL
# --------------------------------------------------------------------------------------------------

LONG_ID = ("eXoGxqgBaJuNkuahMYmiDhg3.e-" * 10)[:255]


def long_patient(ident: str) -> list[dict[str, Any]]:
    resources = patient_resources()
    for resource in resources:
        if resource["resourceType"] == "Patient":
            resource["id"] = ident
    return resources


def test_ids_of_epic_length_are_accepted(client: FlaskClient) -> None:
    draft = gcv_draft() | {"id": LONG_ID, "subject": {"reference": f"Patient/{LONG_ID}"}}
    body = order_select([draft], prefetch=prefetch_for(long_patient(LONG_ID)))
    body["context"].update(patientId=LONG_ID, encounterId=LONG_ID, userId=f"PractitionerRole/{LONG_ID}")
    status, payload = post(client, body)
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]
    assert payload["cards"][0]["suggestions"][0]["actions"][0]["resource"]["id"] == LONG_ID
    assert "Age: 54 years" in payload["cards"][0]["detail"]  # the Patient was found under the long id


@pytest.mark.parametrize("field", ["patientId", "encounterId", "userId", "selections"])
def test_ids_over_the_cap_are_refused_naming_the_field(client: FlaskClient, field: str) -> None:
    body = order_select([gcv_draft()], prefetch=prefetch_for(patient_resources()))
    too_long = "a" * 256
    value: Any = {"userId": f"Practitioner/{too_long}", "selections": [f"MedicationRequest/{too_long}"]}.get(
        field, too_long
    )
    body["context"][field] = value
    status, payload = post(client, body)
    assert status == 400
    expected = "context.selections[0]" if field == "selections" else f"context.{field}"
    assert payload["issue"][0]["expression"] == [expected]


@pytest.mark.parametrize(
    "unsafe",
    ["pat/1", "pat?x=1", "pat#1", "pat%2F1", "pat 1", "pat&_id=x", "pat=1", "..", ".", "pat\n", "pat_1", "pät"],
)
def test_ids_that_could_break_a_url_or_a_query_are_refused(client: FlaskClient, unsafe: str) -> None:
    body = order_select([gcv_draft()], prefetch=prefetch_for(patient_resources()))
    body["context"]["patientId"] = unsafe
    status, payload = post(client, body)
    assert status == 400
    assert payload["issue"][0]["expression"] == ["context.patientId"]
    body = order_select([gcv_draft()], prefetch=prefetch_for(patient_resources()))
    body["context"]["selections"] = [f"MedicationRequest/{unsafe}"]
    status, payload = post(client, body)
    assert status == 400
    assert payload["issue"][0]["expression"] == ["context.selections[0]"]


def test_a_long_id_reaches_the_fhir_query_intact(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    """The prefetch templates put the id in a path and in a query: it arrives there unchanged."""
    draft = gcv_draft() | {"subject": {"reference": f"Patient/{LONG_ID}"}}
    resources = long_patient(LONG_ID)
    body = request([draft], resources=resources, with_server=True)
    body["context"]["patientId"] = LONG_ID
    patient = body["prefetch"].pop("patient")
    del body["prefetch"]["labs"]
    rsps.get(f"{FHIR}/Patient/{LONG_ID}", json=patient)
    rsps.get(f"{FHIR}/Observation", json=body["prefetch"]["bodyMeasurements"] | {"entry": []})
    status, payload = post(client, body)
    assert status == 200, payload
    urls = [call.request.url for call in rsps.calls]
    assert f"{FHIR}/Patient/{LONG_ID}" in urls
    assert any(f"Observation?patient={LONG_ID}&" in str(url) for url in urls)


# --------------------------------------------------------------------------------------------------
# Dose shapes
# --------------------------------------------------------------------------------------------------

ORDERED_500 = {"url": EPIC_ORDERED_DOSE, "valueQuantity": mg(500)}
ADMIN_2_TABS = {
    "url": "https://open.epic.com/fhir/extensions/admin-amount",
    "valueQuantity": {"value": 2, "unit": "tablet", "system": UCUM, "code": "{tbl}"},
}
RATE = {"value": 100, "unit": "mL/h", "system": UCUM, "code": "mL/h"}

# (dosage as sent, doseAndRate as read)
DOSE_SHAPES: dict[str, tuple[dict[str, Any], Any]] = {
    "epic-ordered-dose-only": ({"extension": [ORDERED_500]}, [{"doseQuantity": mg(500)}]),
    "epic-ordered-dose-and-admin-amount": ({"extension": [ADMIN_2_TABS, ORDERED_500]}, [{"doseQuantity": mg(500)}]),
    "pre-r4-doseQuantity": ({"doseQuantity": mg(400)}, [{"doseQuantity": mg(400)}]),
    "pre-r4-doseQuantity-wins-over-ordered-dose": (
        {"extension": [ORDERED_500], "doseQuantity": mg(400)},
        [{"doseQuantity": mg(400)}],
    ),
    "r4-doseQuantity-wins-over-both": (
        {"extension": [ORDERED_500], "doseQuantity": mg(300), "doseAndRate": [{"doseQuantity": mg(400)}]},
        [{"doseQuantity": mg(400)}],
    ),
    "pre-r4-rateQuantity": ({"rateQuantity": RATE}, [{"rateQuantity": RATE}]),
    "ordered-dose-next-to-a-rate": (
        {"extension": [ORDERED_500], "doseAndRate": [{"rateQuantity": RATE}]},
        [{"rateQuantity": RATE, "doseQuantity": mg(500)}],
    ),
    "doseAndRate-object-and-ordered-dose": (
        {"extension": [ORDERED_500], "doseAndRate": {"rateQuantity": RATE}},
        [{"rateQuantity": RATE, "doseQuantity": mg(500)}],
    ),
    "other-extension-only": ({"extension": [ADMIN_2_TABS]}, None),
    "malformed-doseAndRate-left-for-validation": ({"extension": [ORDERED_500], "doseAndRate": "x"}, "x"),
}


@pytest.mark.parametrize(("sent", "read"), DOSE_SHAPES.values(), ids=DOSE_SHAPES.keys())
def test_dose_shapes_are_read_into_r4(sent: dict[str, Any], read: Any) -> None:
    order = {"resourceType": "MedicationRequest", "dosageInstruction": [copy.deepcopy(sent)]}
    dosage = normalise_medication_request(order)["dosageInstruction"][0]
    assert dosage.get("doseAndRate") == read
    assert not {"doseQuantity", "rateQuantity"} & set(dosage) or read == "x"
    assert dosage.get("extension") == sent.get("extension")  # extensions are kept


@pytest.mark.parametrize(("dose", "rule"), [(500, "dose-adjust"), (400, "dose-confirmed-monitoring")])
def test_epic_iv_order_dosed_only_by_its_ordered_dose_extension(client: FlaskClient, dose: float, rule: str) -> None:
    """Epic's IV orders carry the dose only in the ordered-dose extension: 500 mg is corrected to 400 mg,
    400 mg is confirmed (80 kg × 5 mg/kg)."""
    draft = gcv_draft()
    del draft["dosageInstruction"][0]["doseAndRate"]
    draft["dosageInstruction"][0]["extension"] = [{"url": EPIC_ORDERED_DOSE, "valueQuantity": mg(dose)}]
    status, payload = post(client, request([draft]))
    assert status == 200, payload
    assert topics(payload) == [rule]
    if rule == "dose-adjust":
        assert "dose 500 mg (computed 400 mg)" in dose_detail(payload)


def test_pre_r4_dose_on_the_dosage_is_read_not_refused(client: FlaskClient) -> None:
    draft = gcv_draft()
    del draft["dosageInstruction"][0]["doseAndRate"]
    draft["dosageInstruction"][0]["doseQuantity"] = mg(500)
    status, payload = post(client, request([draft]))
    assert status == 200, payload
    assert "dose 500 mg (computed 400 mg)" in dose_detail(payload)


# --------------------------------------------------------------------------------------------------
# medicationReference
# --------------------------------------------------------------------------------------------------


def test_contained_medication_without_display(client: FlaskClient) -> None:
    draft = by_reference(gcv_draft(), "#m1") | {"contained": [medication("m1")]}
    status, payload = post(client, request([draft]))
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]
    update = payload["cards"][0]["suggestions"][0]["actions"][0]["resource"]
    assert update["medicationReference"] == {"reference": "#m1"}
    assert update["contained"] == [medication("m1")]
    assert "medicationCodeableConcept" not in update


def test_medication_as_a_draft_orders_entry(client: FlaskClient) -> None:
    draft = by_reference(gcv_draft(), f"Medication/{EPIC_MEDICATION_ID}")
    status, payload = post(client, request([draft], extra_entries=[medication(EPIC_MEDICATION_ID)]))
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]


def test_medication_in_a_prefetch_bundle(client: FlaskClient) -> None:
    """As ``_include=MedicationRequest:medication`` brings it in the medications search."""
    body = request([by_reference(gcv_draft(), f"{FHIR}/Medication/med-gcv")])
    body["prefetch"]["medications"]["entry"].append({"resource": medication("med-gcv"), "search": {"mode": "include"}})
    status, payload = post(client, body)
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]


def test_medication_ingredients_identify_a_medication_without_code(client: FlaskClient) -> None:
    compounded = {"resourceType": "Medication", "id": "m1", "ingredient": [{"itemCodeableConcept": GANCICLOVIR}]}
    draft = by_reference(gcv_draft(), "#m1") | {"contained": [compounded]}
    status, payload = post(client, request([draft]))
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]


@pytest.mark.parametrize("reference", ["Medication/med-gcv", f"{FHIR}/Medication/med-gcv"])
def test_medication_read_from_fhir_server(client: FlaskClient, rsps: responses.RequestsMock, reference: str) -> None:
    rsps.get(f"{FHIR}/Medication/med-gcv", json=medication("med-gcv"))
    status, payload = post(client, request([by_reference(gcv_draft(), reference)], with_server=True))
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]
    (call,) = rsps.calls
    assert call.request.headers["Authorization"] == "Bearer token-1"


def test_medication_read_sends_the_clients_token_whatever_netrc_says(
    client: FlaskClient, rsps: responses.RequestsMock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A ~/.netrc entry for the FHIR host must not replace the client's bearer token (requests would send its
    Basic credentials instead: service.fhir_client.fhir_session)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine ehr.example.org login operator password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    rsps.get(f"{FHIR}/Medication/med-gcv", json=medication("med-gcv"))
    status, payload = post(client, request([by_reference(gcv_draft(), "Medication/med-gcv")], with_server=True))
    assert status == 200, payload
    (call,) = rsps.calls
    assert call.request.headers["Authorization"] == "Bearer token-1"


def test_unidentifiable_selected_medication_is_412_naming_the_reference(client: FlaskClient) -> None:
    """Never silence because of how a medication is encoded: no contained, entry, prefetch, server or display."""
    status, payload = post(client, request([by_reference(gcv_draft(), "Medication/med-gcv")]))
    assert status == 412
    issue = payload["issue"][0]
    assert issue["code"] == "incomplete"
    assert issue["expression"] == [REFERENCE_PATH]
    assert "Medication/med-gcv" in issue["diagnostics"]
    assert "no fhirServer" in issue["diagnostics"]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (404, "fhirServer has no such Medication"),
        (503, "reading it from fhirServer failed: FHIR server answered HTTP 503"),
    ],
)
def test_failed_read_without_display_is_412(
    client: FlaskClient, rsps: responses.RequestsMock, status: int, reason: str
) -> None:
    rsps.get(f"{FHIR}/Medication/med-gcv", status=status, json={"resourceType": "OperationOutcome"})
    answer, payload = post(client, request([by_reference(gcv_draft(), "Medication/med-gcv")], with_server=True))
    assert answer == 412
    assert reason in payload["issue"][0]["diagnostics"]
    assert payload["issue"][0]["expression"] == [REFERENCE_PATH]


def test_failed_read_falls_back_to_the_display(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    rsps.get(f"{FHIR}/Medication/med-gcv", status=403, json={"resourceType": "OperationOutcome"})
    draft = by_reference(gcv_draft(), "Medication/med-gcv", display="GANCICLOVIR 500 MG IV SOLR")
    status, payload = post(client, request([draft], with_server=True))
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]


@pytest.mark.parametrize(
    "reference",
    [
        "https://other.example.org/fhir/Medication/med-gcv",  # another server: never contacted
        "Medication/med..gcv%2F..",  # not a safe id: never put into a URL
        "#missing",  # a contained reference with nothing contained
        "Substance/s1",  # not a Medication
    ],
)
def test_references_that_cannot_be_followed(client: FlaskClient, rsps: responses.RequestsMock, reference: str) -> None:
    status, payload = post(client, request([by_reference(gcv_draft(), reference)], with_server=True))
    assert status == 412
    assert payload["issue"][0]["expression"] == [REFERENCE_PATH]
    assert len(rsps.calls) == 0
    draft = by_reference(gcv_draft(), reference, display="ganciclovir 500 mg injection")
    status, payload = post(client, request([draft], with_server=True))
    assert status == 200
    assert topics(payload) == ["dose-adjust"]


def test_non_cmv_medication_by_reference_is_silent_without_any_read(
    client: FlaskClient, rsps: responses.RequestsMock
) -> None:
    amoxicillin = medication("med-amox", {"coding": [{"system": RXNORM, "code": "617993"}], "text": "amoxicillin"})
    draft = by_reference(load("draft-amoxicillin.json"), "Medication/med-amox")
    body = request([draft], extra_entries=[amoxicillin], with_server=True)
    status, payload = post(client, body)
    assert (status, payload) == (200, {"cards": []})
    assert len(rsps.calls) == 0


def test_reads_of_several_selected_medications_each_happen_once(
    client: FlaskClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{FHIR}/Medication/med-gcv", json=medication("med-gcv"))
    rsps.get(f"{FHIR}/Medication/med-fos", json=medication("med-fos", {"text": "foscarnet"}))
    gcv = by_reference(gcv_draft(), "Medication/med-gcv")
    fos = by_reference(load("draft-foscarnet.json"), "Medication/med-fos")
    body = request([gcv, fos], with_server=True)
    body["context"]["selections"] = ["MedicationRequest/draft-gcv", "MedicationRequest/draft-fos"]
    status, payload = post(client, body)
    assert status == 200, payload
    assert topics(payload).count("dose-adjust") == 2
    assert sorted(str(call.request.url) for call in rsps.calls) == [
        f"{FHIR}/Medication/med-fos",
        f"{FHIR}/Medication/med-gcv",
    ]


# --- context medications: other drafts, prefetched orders --------------------------------------------------


def mycophenolate_order(reference: str) -> dict[str, Any]:
    """An active order of the fixture patient whose medication is only a reference."""
    return by_reference(medication_order("med-mmf", "(named by reference)", 400), reference)


MYCOPHENOLATE = {"text": "mycophenolate mofetil 500 mg tablet"}


def interaction_detail(payload: dict[str, Any]) -> str:
    found = [card["detail"] for card in payload["cards"] if card["source"]["topic"]["code"] == "interactions"]
    return found[0] if found else ""


def test_prefetched_order_by_reference_is_read_from_fhir_server(
    client: FlaskClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{FHIR}/Medication/med-mmf-1", json=medication("med-mmf-1", MYCOPHENOLATE))
    resources = [*patient_resources(), mycophenolate_order("Medication/med-mmf-1")]
    status, payload = post(client, request([gcv_draft()], resources=resources, with_server=True))
    assert status == 200, payload
    assert "mycophenolate mofetil 500 mg tablet" in interaction_detail(payload)


def test_unreadable_context_medication_never_sinks_the_call(
    client: FlaskClient, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    rsps.get(f"{FHIR}/Medication/med-mmf-1", status=500, json={"resourceType": "OperationOutcome"})
    resources = [*patient_resources(), mycophenolate_order("Medication/med-mmf-1")]
    with caplog.at_level(logging.WARNING, logger="cmv_cds"):
        status, payload = post(client, request([gcv_draft()], resources=resources, with_server=True))
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]
    (record,) = [r for r in caplog.records if r.getMessage() == "medications not identified"]
    assert record.unidentified_medications == 1  # type: ignore[attr-defined]


def test_context_reads_are_capped_and_the_losses_counted(
    client: FlaskClient, rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(medication_refs, "CONTEXT_READ_CAP", 2)
    for n in range(4):
        rsps.get(f"{FHIR}/Medication/med-{n}", json=medication(f"med-{n}", MYCOPHENOLATE))
    orders = [mycophenolate_order(f"Medication/med-{n}") | {"id": f"mmf-{n}"} for n in range(4)]
    with caplog.at_level(logging.WARNING, logger="cmv_cds"):
        status, payload = post(
            client, request([gcv_draft()], resources=[*patient_resources(), *orders], with_server=True)
        )
    assert status == 200, payload
    assert len(rsps.calls) == 2
    (record,) = [r for r in caplog.records if r.getMessage() == "medications not identified"]
    assert record.unidentified_medications == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "junk",
    [
        {"medicationReference": "Medication/m1"},
        {"medicationReference": {"reference": 7, "display": ["x"]}},
        {"medicationReference": {"reference": "#m1"}, "contained": 5},
        {
            "medicationReference": {"reference": "#m1"},
            "contained": [{"resourceType": "Medication", "id": "m1", "ingredient": 3}],
        },
        {"medicationReference": {"reference": "Medication/.."}},
        {
            "medicationReference": {"reference": "Medication/m1"},
            "dosageInstruction": [{"doseQuantity": "x", "extension": 4}],
        },
        {"medicationReference": {"reference": "Medication/m1"}, "dosageInstruction": {"doseAndRate": 1}},
        {"medicationReference": {"reference": "Medication/m1"}, "category": {"text": "x"}, "dosageInstruction": [None]},
    ],
)
def test_malformed_context_medications_never_sink_the_call(
    client: FlaskClient, rsps: responses.RequestsMock, junk: dict[str, Any]
) -> None:
    rsps.get(f"{FHIR}/Medication/m1", json={"resourceType": "Medication", "id": "m1", "code": {"coding": "junk"}})
    other = load("draft-amoxicillin.json") | {"id": "draft-other"}
    del other["medicationCodeableConcept"]
    prefetched = mycophenolate_order("Medication/x") | junk
    body = request([gcv_draft(), other | junk], resources=[*patient_resources(), prefetched], with_server=True)
    body["context"]["selections"] = ["MedicationRequest/draft-gcv"]
    status, payload = post(client, body)
    assert status == 200, payload
    assert topics(payload) == ["dose-adjust"]


def test_other_draft_by_reference_is_identified_from_its_entry(client: FlaskClient) -> None:
    other = mycophenolate_order("Medication/med-mmf-1") | {"id": "draft-mmf", "status": "draft"}
    body = request([gcv_draft(), other], extra_entries=[medication("med-mmf-1", MYCOPHENOLATE)])
    status, payload = post(client, body)
    assert status == 200, payload
    assert "mycophenolate mofetil 500 mg tablet** (draft order" in interaction_detail(payload)


# --------------------------------------------------------------------------------------------------
# References, Epic's "no results" Bundle, the request extension
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "parts"),
    [
        ("Patient/p1", ("Patient", "p1")),
        ("https://host/fhir/R4/Patient/e.X-1", ("Patient", "e.X-1")),
        ("https://host/fhir/R4/Medication/m1/_history/3", ("Medication", "m1")),
        ("Medication/m1?x=1", ("Medication", "m1")),
        ("#med1", None),
        ("p1", None),
        ("", None),
        (42, None),
    ],
)
def test_reference_parts(reference: Any, parts: tuple[str, str] | None) -> None:
    assert reference_parts(reference) == parts


@pytest.mark.parametrize(
    ("subject", "status"),
    [
        (f"https://ehr.example.org/fhir/R4/Patient/{PATIENT_ID}", 200),
        ("https://ehr.example.org/fhir/R4/Patient/other", 400),
    ],
)
def test_absolute_subject_reference_is_checked_like_a_relative_one(
    client: FlaskClient, subject: str, status: int
) -> None:
    draft = gcv_draft() | {"subject": {"reference": subject, "display": "Patient, Test"}}
    answer, payload = post(client, request([draft]))
    assert answer == status, payload
    if status == 400:
        assert payload["issue"][0]["expression"] == ["context.draftOrders.entry[0].resource.subject"]


def test_epic_no_results_bundle_is_no_data_and_not_refetched(client: FlaskClient, rsps: responses.RequestsMock) -> None:
    """Epic answers an empty search with total 0 and one OperationOutcome entry in search mode outcome."""
    body = request([gcv_draft()], with_server=True)
    body["prefetch"]["conditions"] = load("ehr/epic-order-select-ganciclovir-iv.json")["prefetch"]["conditions"]
    assert body["prefetch"]["conditions"]["entry"][0]["search"] == {"mode": "outcome"}
    status, payload = post(client, body)
    assert status == 200, payload
    assert len(rsps.calls) == 0


def test_request_extension_is_kept_and_logged_by_key_only(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    body = request([gcv_draft()])
    body["extension"] = load("ehr/epic-order-select-ganciclovir-iv.json")["extension"] | {
        "com.example.secret": "MRN-5550123",
        "bad key with spaces": "x",
    }
    with caplog.at_level(logging.INFO, logger="cmv_cds"):
        status, _ = post(client, body)
    assert status == 200
    (record,) = [r for r in caplog.records if r.getMessage() == "request extension"]
    keys = record.extension_keys  # type: ignore[attr-defined]
    assert "com.epic.cdshooks.request.cds-hooks-specification-version" in keys
    assert "com.example.secret" in keys
    assert "bad key with spaces" not in keys
    assert not any("MRN-5550123" in r.getMessage() or "MRN-5550123" in str(r.__dict__) for r in caplog.records)
