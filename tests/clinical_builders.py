"""Small FHIR resource builders for clinical tests (values chosen per test, dates relative to today)."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

from cards.engine import ClinicalOptions, HookRequest, evaluate
from cards.model import Card

PATIENT_ID = "pat-t"
_ids = itertools.count(1)


def day(today: dt.date, days_ago: int) -> str:
    return (today - dt.timedelta(days=days_ago)).isoformat()


def patient(age: int, sex: str, today: dt.date) -> dict[str, Any]:
    birthday = today - dt.timedelta(days=30)
    return {
        "resourceType": "Patient",
        "id": PATIENT_ID,
        "gender": sex,
        "birthDate": birthday.replace(year=birthday.year - age).isoformat(),
    }


def observation(
    loinc: str, value: float | None, unit: str, today: dt.date, days_ago: int = 1, **extra: Any
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": f"obs-{next(_ids)}",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "effectiveDateTime": day(today, days_ago),
    }
    if value is not None:
        resource["valueQuantity"] = {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}
    resource.update(extra)
    return resource


def condition(
    text: str, today: dt.date, snomed: str | None = None, severity: str | None = None, status: str = "active"
) -> dict[str, Any]:
    code: dict[str, Any] = {"text": text}
    if snomed:
        code["coding"] = [{"system": "http://snomed.info/sct", "code": snomed}]
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": f"cond-{next(_ids)}",
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}]
        },
        "code": code,
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "recordedDate": day(today, 2),
    }
    if severity:
        resource["severity"] = {"coding": [{"system": "http://snomed.info/sct", "code": "24484000"}], "text": severity}
    return resource


def medication(
    text: str,
    today: dt.date,
    started_days_ago: int = 30,
    status: str = "active",
    route: str | None = None,
    ended_days_ago: int | None = None,
) -> dict[str, Any]:
    repeat: dict[str, Any] = {"boundsPeriod": {"start": day(today, started_days_ago)}}
    if ended_days_ago is not None:
        repeat["boundsPeriod"]["end"] = day(today, ended_days_ago)
    dosage: dict[str, Any] = {"timing": {"repeat": repeat}}
    if route:
        dosage["route"] = {"text": route}
    return {
        "resourceType": "MedicationRequest",
        "id": f"med-{next(_ids)}",
        "status": status,
        "intent": "order",
        "medicationCodeableConcept": {"text": text},
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "authoredOn": day(today, started_days_ago),
        "dosageInstruction": [dosage],
    }


def draft(
    drug_text: str,
    rxnorm: str | None = None,
    dose_mg: float | None = None,
    route: str | None = None,
    frequency: int | None = None,
    period: float | None = None,
    period_unit: str | None = None,
    text: str | None = None,
    draft_id: str = "draft-1",
) -> dict[str, Any]:
    concept: dict[str, Any] = {"text": drug_text}
    if rxnorm:
        concept["coding"] = [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": rxnorm}]
    dosage: dict[str, Any] = {}
    if text:
        dosage["text"] = text
    if route:
        dosage["route"] = {"text": route}
    if dose_mg is not None:
        dosage["doseAndRate"] = [
            {"doseQuantity": {"value": dose_mg, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}
        ]
    if frequency is not None:
        dosage["timing"] = {"repeat": {"frequency": frequency, "period": period, "periodUnit": period_unit}}
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": draft_id,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": concept,
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
    }
    if dosage:
        resource["dosageInstruction"] = [dosage]
    return resource


def normal_counts(today: dt.date) -> list[dict[str, Any]]:
    return [
        observation("751-8", 3000, "/uL", today),
        observation("777-3", 200000, "/uL", today),
        observation("718-7", 12.0, "g/dL", today),
    ]


def run(
    selected: list[dict[str, Any]],
    resources: list[dict[str, Any]],
    today: dt.date,
    others: list[dict[str, Any]] | None = None,
    options: ClinicalOptions | None = None,
) -> list[Card]:
    request = HookRequest(
        hook="order-select",
        patient_id=PATIENT_ID,
        today=today,
        selected_orders=selected,
        other_draft_orders=others or [],
        resources=resources,
    )
    return evaluate(request, options or ClinicalOptions())


def proposed(card: Card, resource_type: str = "MedicationRequest") -> list[dict[str, Any]]:
    """Resources created or updated by the card's first (recommended) suggestion."""
    assert card.suggestions, f"card {card.rule_id} has no suggestion"
    return [
        a.resource
        for a in card.suggestions[0].actions
        if a.resource is not None and a.resource["resourceType"] == resource_type
    ]


def by_rule(cards: list[Card], rule_id: str) -> Card:
    matches = [c for c in cards if c.rule_id == rule_id]
    assert matches, f"no {rule_id} card among {[c.rule_id for c in cards]}"
    return matches[0]
