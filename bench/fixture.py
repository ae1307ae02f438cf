"""The benchmark's request: a realistic order-select call with every prefetch key filled.

A 54-year-old male kidney-transplant recipient (80 kg, serum creatinine 1.0 mg/dL) with CMV DNAemia on
tacrolimus, mycophenolate, prednisone, trimethoprim-sulfamethoxazole and amlodipine. The clinician
selects ganciclovir 500 mg IV every 12 hours (the label dose is 5 mg/kg = 400 mg), so the service
answers with a dose card carrying an ``update`` suggestion, plus an interactions card.

22 prefetched resources (Patient, 2 weights, height, 3 creatinines, ANC, platelets, hemoglobin, 4 viral
loads, 3 Conditions, 5 active MedicationRequests) and 2 draft orders (the selected ganciclovir and an
unselected pantoprazole). Dates are relative to the day the benchmark runs, so the data is never stale.
The patient is invented.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

PATIENT_ID = "pat-bench-1"
SERVICE_ID = "cmv-antiviral-order-select"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
UCUM = "http://unitsofmeasure.org"
SUBJECT = {"reference": f"Patient/{PATIENT_ID}"}


def _day(today: dt.date, days_ago: int) -> str:
    return (today - dt.timedelta(days=days_ago)).isoformat()


def _observation(
    today: dt.date, ident: str, code: str, display: str, days_ago: int, value: float, unit: str, ucum: str
) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "id": ident,
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
        "subject": SUBJECT,
        "effectiveDateTime": _day(today, days_ago) + "T07:30:00Z",
        "issued": _day(today, days_ago) + "T09:12:00Z",
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": ucum},
    }


def _condition(today: dt.date, ident: str, code: str, display: str, text: str, days_ago: int) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": ident,
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]
        },
        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}], "text": text},
        "subject": SUBJECT,
        "recordedDate": _day(today, days_ago),
    }


def _medication(today: dt.date, ident: str, text: str, dosage: str, days_ago: int) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "id": ident,
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": text},
        "subject": SUBJECT,
        "authoredOn": _day(today, days_ago),
        "dosageInstruction": [{"text": dosage}],
    }


def resources_by_key(today: dt.date | None = None) -> dict[str, list[dict[str, Any]]]:
    """The patient's FHIR R4 data, grouped by the service's prefetch keys."""
    day = today or dt.date.today()
    vl_code, vl_display = "72493-0", "Cytomegalovirus DNA [Units/volume] (viral load) in Serum or Plasma by NAA"
    scr_display = "Creatinine [Mass/volume] in Serum or Plasma"
    return {
        "patient": [
            {
                "resourceType": "Patient",
                "id": PATIENT_ID,
                "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "MRN-BENCH-0001"}],
                "name": [{"family": "Benchmark", "given": ["Pat"]}],
                "gender": "male",
                "birthDate": _day(day, 54 * 365 + 40),
            }
        ],
        "bodyMeasurements": [
            _observation(day, "obs-weight", "29463-7", "Body weight", 2, 80, "kg", "kg"),
            _observation(day, "obs-weight-old", "29463-7", "Body weight", 25, 82.5, "kg", "kg"),
            _observation(day, "obs-height", "8302-2", "Body height", 40, 178, "cm", "cm"),
        ],
        "labs": [
            _observation(day, "obs-scr", "2160-0", scr_display, 1, 1.0, "mg/dL", "mg/dL"),
            _observation(day, "obs-scr-2", "2160-0", scr_display, 4, 1.1, "mg/dL", "mg/dL"),
            _observation(day, "obs-scr-3", "2160-0", scr_display, 9, 1.3, "mg/dL", "mg/dL"),
            _observation(day, "obs-anc", "751-8", "Neutrophils [#/volume] in Blood", 1, 2.4, "10*3/uL", "10*3/uL"),
            _observation(day, "obs-plt", "777-3", "Platelets [#/volume] in Blood", 1, 180, "10*3/uL", "10*3/uL"),
            _observation(day, "obs-hgb", "718-7", "Hemoglobin [Mass/volume] in Blood", 1, 11.2, "g/dL", "g/dL"),
        ],
        "cmvViralLoads": [
            _observation(day, f"obs-vl-{i}", vl_code, vl_display, days_ago, value, "IU/mL", "[IU]/mL")
            for i, (days_ago, value) in enumerate(((20, 1200), (13, 4100), (6, 8200), (2, 24500)), start=1)
        ],
        "conditions": [
            _condition(day, "cond-cmv", "28944009", "Cytomegalovirus infection", "CMV DNAemia", 3),
            _condition(
                day, "cond-ktx", "161663000", "History of being a tissue or organ recipient", "Kidney transplant", 400
            ),
            _condition(day, "cond-htn", "38341003", "Hypertensive disorder", "Hypertension", 900),
        ],
        "medications": [
            _medication(day, "med-tacrolimus", "tacrolimus 1 mg capsule", "3 mg PO twice daily", 390),
            _medication(day, "med-mmf", "mycophenolate mofetil 500 mg tablet", "1 g PO twice daily", 390),
            _medication(day, "med-pred", "prednisone 5 mg tablet", "5 mg PO daily", 390),
            _medication(day, "med-tmpsmx", "trimethoprim-sulfamethoxazole 80-400 mg tablet", "1 tab PO daily", 380),
            _medication(day, "med-amlodipine", "amlodipine 5 mg tablet", "5 mg PO daily", 200),
        ],
    }


def searchset(resources: list[dict[str, Any]], base: str = "http://127.0.0.1/fhir") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in resources
        ],
    }


def prefetch(today: dt.date | None = None) -> dict[str, Any]:
    """Every prefetch key filled, as a conformant CDS client sends them."""
    return {
        key: (resources[0] if key == "patient" else searchset(resources))
        for key, resources in resources_by_key(today).items()
    }


def draft_orders(today: dt.date | None = None) -> list[dict[str, Any]]:
    day = (today or dt.date.today()).isoformat()
    ganciclovir = {
        "resourceType": "MedicationRequest",
        "id": "draft-gcv",
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "310442", "display": "ganciclovir 500 MG Injection"}],
            "text": "ganciclovir 500 mg injection",
        },
        "subject": SUBJECT,
        "authoredOn": day,
        "dosageInstruction": [
            {
                "text": "500 mg IV every 12 hours",
                "timing": {"repeat": {"frequency": 1, "period": 12, "periodUnit": "h"}},
                "route": {"coding": [{"system": SNOMED, "code": "47625008", "display": "Intravenous route"}]},
                "doseAndRate": [{"doseQuantity": {"value": 500, "unit": "mg", "system": UCUM, "code": "mg"}}],
            }
        ],
    }
    pantoprazole = {
        "resourceType": "MedicationRequest",
        "id": "draft-ppi",
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {"text": "pantoprazole 40 mg tablet"},
        "subject": SUBJECT,
        "authoredOn": day,
        "dosageInstruction": [{"text": "40 mg PO daily"}],
    }
    return [ganciclovir, pantoprazole]


def order_select(
    *, with_prefetch: bool = True, fhir_server: str | None = None, today: dt.date | None = None
) -> dict[str, Any]:
    """The order-select request body (full prefetch by default; or no prefetch and a fhirServer)."""
    drafts = draft_orders(today)
    body: dict[str, Any] = {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": {
            "userId": "Practitioner/prac-bench",
            "patientId": PATIENT_ID,
            "encounterId": "enc-bench-1",
            "selections": ["MedicationRequest/draft-gcv"],
            "draftOrders": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": d} for d in drafts],
            },
        },
    }
    if with_prefetch:
        body["prefetch"] = prefetch(today)
    if fhir_server is not None:
        body["fhirServer"] = fhir_server
        body["fhirAuthorization"] = {
            "access_token": "bench-token",
            "token_type": "Bearer",
            "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read user/Condition.read user/MedicationRequest.read",
            "subject": "cmv-cds-bench",
        }
    return body


def resource_count(body: dict[str, Any]) -> int:
    """Prefetched resources plus draft orders in a body built by :func:`order_select`."""
    count = len(body["context"]["draftOrders"]["entry"])
    for value in (body.get("prefetch") or {}).values():
        count += len(value["entry"]) if value.get("resourceType") == "Bundle" else 1
    return count
