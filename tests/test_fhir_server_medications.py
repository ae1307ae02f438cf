"""Medications ordered by reference, against a real FHIR server (Medplum's in-memory router, tests/fhir_server).

The selected draft names a Medication only the server holds: the service reads it (one GET of
``Medication/<id>`` with the client's token) and doses the order. The patient's active mycophenolate is
ordered by reference too: the ``medications`` prefetch template asks for ``_include=MedicationRequest:medication``,
so the server returns that Medication in the same search and no further read is needed.
"""

from __future__ import annotations

import pytest
from fhir_fixtures import by_reference, medication_order, order_select
from fhir_server_fixture import FhirTestServer
from fhir_server_fixture import fhir_server as fhir_server  # the module-scoped fixture
from flask.testing import FlaskClient
from test_fhir_server_integration import app as app  # the fixture: auth off, generous FHIR timeouts
from test_fhir_server_integration import copy_of_fixture_patient, fhir_authorization, gcv_draft

from service.registry import prefetch_templates

pytestmark = pytest.mark.fhirserver

URL = "/cds-services/cmv-antiviral-order-select"
PATIENT = "pat-medref-1"
GANCICLOVIR = {
    "resourceType": "Medication",
    "id": "med-ganciclovir-iv",
    "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "310442"}]},
}
MYCOPHENOLATE = {
    "resourceType": "Medication",
    "id": "med-mycophenolate",
    "code": {"text": "mycophenolate mofetil 500 mg"},
}


def seed(server: FhirTestServer) -> None:
    resources = copy_of_fixture_patient(PATIENT, "mr-")
    mycophenolate_order = by_reference(
        medication_order("mr-mycophenolate", "(named by reference)", 400), "Medication/med-mycophenolate"
    )
    mycophenolate_order["subject"] = {"reference": f"Patient/{PATIENT}"}
    server.put_all([*resources, GANCICLOVIR, MYCOPHENOLATE, mycophenolate_order])


def test_the_medications_template_brings_the_referenced_medications(fhir_server: FhirTestServer) -> None:
    seed(fhir_server)
    (template,) = [t for t in prefetch_templates() if t.key == "medications"]
    response = fhir_server.get(template.query.replace("{{context.patientId}}", PATIENT))
    assert response.status_code == 200
    modes = {(e["resource"]["resourceType"], e["search"]["mode"]) for e in response.json()["entry"]}
    assert ("Medication", "include") in modes


def test_selected_medication_read_from_the_server_and_context_medication_included(
    client: FlaskClient, fhir_server: FhirTestServer
) -> None:
    seed(fhir_server)
    draft = gcv_draft(PATIENT)
    del draft["medicationCodeableConcept"]
    draft["medicationReference"] = {"reference": "Medication/med-ganciclovir-iv"}
    body = order_select(
        [draft], fhirServer=fhir_server.base_url, fhirAuthorization=fhir_authorization(fhir_server.token)
    )
    body["context"]["patientId"] = PATIENT
    response = client.post(URL, json=body)
    assert response.status_code == 200, response.get_json()
    cards = response.get_json()["cards"]
    topics = [card["source"]["topic"]["code"] for card in cards]
    assert topics[0] == "dose-adjust"
    assert "mycophenolate mofetil 500 mg" in next(
        c["detail"] for c in cards if c["source"]["topic"]["code"] == "interactions"
    )
    update = cards[0]["suggestions"][0]["actions"][0]["resource"]
    assert update["medicationReference"] == {"reference": "Medication/med-ganciclovir-iv"}
