"""FHIR fixture files for tests, with dates relative to the day the test runs, and builders of more
resources for the fixture patient.

Fixture JSON may contain ``"$today"``, ``"$today-Nd"`` (N days ago) and ``"$birth-N"`` (a birth date
that makes the patient N completed years old today, 30 days past the birthday).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import uuid
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PATIENT_ID = "pat-cmv-1"
_TOKEN = re.compile(r"^\$(today|birth)(?:-(\d+)d?)?$")


def relative_date(token: str, today: dt.date) -> str:
    match = _TOKEN.match(token)
    if not match:
        return token
    kind, amount = match.group(1), int(match.group(2) or 0)
    if kind == "today":
        return (today - dt.timedelta(days=amount)).isoformat()
    birthday = today - dt.timedelta(days=30)
    try:
        return birthday.replace(year=birthday.year - amount).isoformat()
    except ValueError:  # 29 February
        return birthday.replace(year=birthday.year - amount, day=28).isoformat()


def _resolve(value: Any, today: dt.date) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        return relative_date(value, today)
    if isinstance(value, dict):
        return {key: _resolve(item, today) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, today) for item in value]
    return value


def load(name: str, today: dt.date | None = None) -> Any:
    """A fixture file with its relative dates resolved."""
    data = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    return _resolve(data, today or dt.date.today())


def patient_resources(today: dt.date | None = None, name: str = "adult-transplant-cmv.json") -> list[dict[str, Any]]:
    return [entry["resource"] for entry in load(name, today)["entry"]]


def day(days_ago: int) -> str:
    """The date ``days_ago`` days before today (ISO 8601)."""
    return (dt.date.today() - dt.timedelta(days=days_ago)).isoformat()


def observation(oid: str, loinc: str, value: float | None, unit: str, days_ago: int, **extra: Any) -> dict[str, Any]:
    """A final Observation of the fixture patient (``value`` None: no valueQuantity; ``extra``: more elements)."""
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "effectiveDateTime": day(days_ago),
    }
    if value is not None:
        resource["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    resource.update(extra)
    return resource


def condition(cid: str, text: str, snomed: str | None = None, severe: bool = False) -> dict[str, Any]:
    """An active Condition of the fixture patient, recorded yesterday, with a SNOMED code if given."""
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": cid,
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "code": {
            "text": text,
            **({"coding": [{"system": "http://snomed.info/sct", "code": snomed}]} if snomed else {}),
        },
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "recordedDate": day(1),
    }
    if severe:
        resource["severity"] = {
            "coding": [{"system": "http://snomed.info/sct", "code": "24484000", "display": "Severe"}]
        }
    return resource


def patient_data(
    drop: tuple[str, ...] = (), add: tuple[dict[str, Any], ...] = (), **patient_fields: Any
) -> list[dict[str, Any]]:
    """The fixture patient's resources without those whose ids are in ``drop``, with ``add``, and the Patient's
    elements changed by ``patient_fields``."""
    resources = [r for r in patient_resources() if r["id"] not in drop]
    for resource in resources:
        if resource["resourceType"] == "Patient":
            resource.update(patient_fields)
    return [*resources, *add]


def medication_order(
    mid: str, text: str, started_days_ago: int, route: str | None = None, status: str = "active"
) -> dict[str, Any]:
    """A MedicationRequest of the fixture patient, named by text, started ``started_days_ago`` days ago."""
    dosage: dict[str, Any] = {"timing": {"repeat": {"boundsPeriod": {"start": day(started_days_ago)}}}}
    if route:
        dosage["route"] = {"text": route}
    return {
        "resourceType": "MedicationRequest",
        "id": mid,
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"text": text},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "authoredOn": day(started_days_ago),
        "dosageInstruction": [dosage],
    }


def ganciclovir_draft(dose: float = 500, **changes: Any) -> dict[str, Any]:
    """The fixture ganciclovir draft (IV q12h) at ``dose`` mg, with other elements changed by ``changes``."""
    order: dict[str, Any] = load("draft-ganciclovir.json")
    order["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"]["value"] = dose
    order.update(changes)
    return order


def by_reference(order: dict[str, Any], reference: str, display: str | None = None) -> dict[str, Any]:
    """A copy of ``order`` naming its medication by ``reference`` (and ``display``) instead of a concept."""
    changed = copy.deepcopy(order)
    del changed["medicationCodeableConcept"]
    changed["medicationReference"] = {"reference": reference} | ({"display": display} if display else {})
    return changed


def dose_of(resource: dict[str, Any]) -> tuple[float, int, float, str]:
    """A MedicationRequest's first dosage: (dose value, frequency, period, periodUnit)."""
    dosage = resource["dosageInstruction"][0]
    repeat = dosage["timing"]["repeat"]
    return (
        dosage["doseAndRate"][0]["doseQuantity"]["value"],
        repeat["frequency"],
        repeat["period"],
        repeat["periodUnit"],
    )


def searchset(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": len(resources),
        "entry": [
            {"fullUrl": f"{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}} for r in resources
        ],
    }


def prefetch_for(resources: list[dict[str, Any]]) -> dict[str, Any]:
    """Fill the service's prefetch keys as a conformant client would (by resource type and code)."""
    from cards.codes import code_set

    def coded(resource: dict[str, Any], *sets: str) -> bool:
        return any(code_set(name).matches_coding_only(resource.get("code")) for name in sets)

    observations = [r for r in resources if r["resourceType"] == "Observation"]
    patient = next((r for r in resources if r["resourceType"] == "Patient"), None)
    return {
        "patient": patient,
        "bodyMeasurements": searchset([o for o in observations if coded(o, "BodyWeight", "BodyHeight")]),
        "labs": searchset(
            [
                o
                for o in observations
                if coded(
                    o,
                    "SerumCreatinine",
                    "NeutrophilCount",
                    "PlateletCount",
                    "Hemoglobin",
                    "UrineProtein",
                    "PregnancyTest",
                )
            ]
        ),
        "cmvViralLoads": searchset(
            [
                o
                for o in observations
                if coded(o, "CmvViralLoadIU", "CmvViralLoadLog10IU", "CmvViralLoadCopies", "CmvDnaQualitative")
            ]
        ),
        "conditions": searchset([r for r in resources if r["resourceType"] == "Condition"]),
        "medications": searchset([r for r in resources if r["resourceType"] == "MedicationRequest"]),
    }


def order_select(
    drafts: list[dict[str, Any]],
    selections: list[str] | None = None,
    prefetch: dict[str, Any] | None = None,
    hook: str = "order-select",
    **extra: Any,
) -> dict[str, Any]:
    """A realistic order-select (or order-sign) request body."""
    context: dict[str, Any] = {
        "userId": "Practitioner/prac-1",
        "patientId": PATIENT_ID,
        "encounterId": "enc-1",
        "draftOrders": {
            "resourceType": "Bundle",
            "type": "collection",
            "entry": [{"resource": copy.deepcopy(d)} for d in drafts],
        },
    }
    if hook == "order-select":
        context["selections"] = selections if selections is not None else [f"MedicationRequest/{drafts[0]['id']}"]
    body: dict[str, Any] = {"hook": hook, "hookInstance": str(uuid.uuid4()), "context": context}
    if prefetch is not None:
        body["prefetch"] = prefetch
    body.update(extra)
    return body
