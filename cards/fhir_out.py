"""The FHIR R4 resources the cards propose, encoded as docs/policy.md §13 fixes.

MedicationRequest: status ``draft``, intent ``order``, the patient as subject, medicationCodeableConcept
(generic name as text + an RxNorm coding taken from the drug's ValueSet, only a code docs/clinical-basis.md
verifies), dosageInstruction[0] with text, SNOMED route, timing.repeat and doseQuantity in mg (UCUM),
reasonCode CMV and a note with the computation. ServiceRequests (monitoring) are drafts coded in LOINC.
Tests validate every proposed resource with the fhir.resources R4B models.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from cards.codes import LOINC, RXNORM, SNOMED, Concept, code_set
from cards.dosing import Schedule
from cards.model import new_uuid

UCUM = "http://unitsofmeasure.org"
ROUTES = {
    "iv": {"system": SNOMED, "code": "47625008", "display": "Intravenous route"},  # docs/policy.md §13
    "oral": {"system": SNOMED, "code": "26643006", "display": "Oral route"},  # docs/policy.md §13
}
GENERIC_NAMES = {
    "Ganciclovir": "ganciclovir",
    "Valganciclovir": "valganciclovir",
    "Foscarnet": "foscarnet",
    "Cidofovir": "cidofovir",
    "Probenecid": "probenecid",
}


@functools.cache
def verified_rxnorm(set_name: str) -> Concept | None:
    """The first RxNorm code of a drug's ValueSet marked VERIFIED (any kind; docs/clinical-basis.md §9), if any."""
    for concept in code_set(set_name).concepts:
        if concept.system == RXNORM and concept.verification.startswith("VERIFIED"):
            return concept
    return None


def medication_concept(set_name: str, text: str | None = None) -> dict[str, Any]:
    """medicationCodeableConcept: generic name as text and, where one is verified, an RxNorm coding."""
    concept: dict[str, Any] = {"text": text or GENERIC_NAMES.get(set_name, set_name)}
    coded = verified_rxnorm(set_name)
    if coded is not None:
        concept["coding"] = [{"system": RXNORM, "code": coded.code, "display": coded.display}]
    return concept


@functools.cache
def cmv_reason() -> dict[str, Any]:
    """reasonCode: CMV infection (SNOMED 28944009, docs/clinical-basis.md §9), from the CmvInfection ValueSet."""
    concept = next(c for c in code_set("CmvInfection").concepts if c.system == SNOMED)
    return {
        "coding": [{"system": SNOMED, "code": concept.code, "display": concept.display}],
        "text": "CMV infection",
    }


def _days(value: int) -> dict[str, Any]:
    return {"value": value, "unit": "days", "system": UCUM, "code": "d"}


# Built on every call: a written __init__ (init=False), native constructors, see cards/model.py above Coding.
@dataclass(frozen=True, init=False)
class DoseSpec:
    """One dosage line of a proposed MedicationRequest."""

    text: str
    amount: float
    amount_unit: Literal["mg", "mL"]
    schedule: Schedule
    route: Literal["iv", "oral"]
    duration_days: int | None = None
    count: int | None = None
    sequence: int | None = None

    def __init__(
        self,
        text: str,
        amount: float,
        amount_unit: Literal["mg", "mL"],
        schedule: Schedule,
        route: Literal["iv", "oral"],
        duration_days: int | None = None,
        count: int | None = None,
        sequence: int | None = None,
    ) -> None:
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "amount", amount)
        object.__setattr__(self, "amount_unit", amount_unit)
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "route", route)
        object.__setattr__(self, "duration_days", duration_days)
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "sequence", sequence)

    def to_fhir(self) -> dict[str, Any]:
        """The FHIR R4 Dosage this spec describes (docs/policy.md §13)."""
        repeat: dict[str, Any] = {
            "frequency": self.schedule.frequency,
            "period": self.schedule.period,
            "periodUnit": self.schedule.period_unit,
        }
        if self.duration_days is not None:
            repeat["boundsDuration"] = _days(self.duration_days)
        if self.count is not None:
            repeat["count"] = self.count
        dosage: dict[str, Any] = {
            "text": self.text,
            "timing": {"repeat": repeat},
            "route": {"coding": [ROUTES[self.route]], "text": "IV" if self.route == "iv" else "oral"},
            "doseAndRate": [
                {
                    "doseQuantity": {
                        "value": _number(self.amount),
                        "unit": self.amount_unit,
                        "system": UCUM,
                        "code": self.amount_unit,
                    }
                }
            ],
        }
        if self.schedule.after_dialysis:
            # Timing has no event code for dialysis: the instruction carries it, so a client that shows the
            # structured dosage (not its text) still says when to give it.
            dosage["additionalInstruction"] = [{"text": "after each hemodialysis session"}]
        if self.sequence is not None:
            dosage["sequence"] = self.sequence
        return dosage


def json_copy(value: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a JSON object (a resource as parsed from a request).

    Why not copy.deepcopy: an orjson round trip copies a draft MedicationRequest in ~4 µs instead of ~25
    µs, and JSON data comes out identical. Values orjson cannot write (non-JSON types a caller may pass)
    fall back to deepcopy.
    """
    try:
        copied: dict[str, Any] = orjson.loads(orjson.dumps(value))
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return copy.deepcopy(dict(value))
    return copied


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else round(value, 3)


def new_medication_request(
    patient_id: str, medication: dict[str, Any], dosages: list[DoseSpec], note: str
) -> dict[str, Any]:
    """A new draft MedicationRequest (for a ``create`` action)."""
    return {
        "resourceType": "MedicationRequest",
        "id": new_uuid(),
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": medication,
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonCode": [cmv_reason()],
        "dosageInstruction": [d.to_fhir() for d in dosages],
        "note": [{"text": note}],
    }


def updated_medication_request(draft: Mapping[str, Any], dosage: DoseSpec, note: str, set_name: str) -> dict[str, Any]:
    """The selected draft in its entirety with the computed dosage (an ``update`` keeps its id).

    Every element of the draft is kept, except what docs/policy.md §13 requires of a proposal: status/intent,
    a medicationCodeableConcept with the generic name as text and an RxNorm coding (added to the
    clinician's own codings when missing; a medicationReference becomes the equivalent concept, keeping
    its display), reasonCode CMV if the draft had none, and a note with the computation.
    """
    updated = json_copy(draft)
    reference = updated.pop("medicationReference", None)
    concept = updated.get("medicationCodeableConcept")
    if not isinstance(concept, dict):
        display = reference.get("display") if isinstance(reference, dict) else None
        concept = medication_concept(set_name, display if isinstance(display, str) else None)
    else:
        if not isinstance(concept.get("text"), str) or not concept["text"].strip():
            concept["text"] = GENERIC_NAMES.get(set_name, set_name)
        codings = [c for c in concept.get("coding") or [] if isinstance(c, dict)]
        coded = verified_rxnorm(set_name)
        if coded is not None and not any(c.get("system") == RXNORM for c in codings):
            codings.append({"system": RXNORM, "code": coded.code, "display": coded.display})
        if codings:
            concept["coding"] = codings
    updated["medicationCodeableConcept"] = concept
    updated["status"] = "draft"
    updated["intent"] = "order"
    updated["dosageInstruction"] = [dosage.to_fhir()]
    updated.setdefault("reasonCode", [cmv_reason()])
    notes = [n for n in updated.get("note") or [] if isinstance(n, dict)]
    updated["note"] = [*notes, {"text": note}]
    return updated


def service_request(
    patient_id: str,
    set_name: str,
    text: str,
    note: str,
    schedule: Schedule | None = None,
    duration_days: int | None = None,
) -> dict[str, Any]:
    """A draft ServiceRequest for a lab, coded with the first LOINC code of ``set_name`` (docs/policy.md §12-§13)."""
    concept = next(c for c in code_set(set_name).concepts if c.system == LOINC)
    request: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": new_uuid(),
        "status": "draft",
        "intent": "order",
        "code": {
            "coding": [{"system": LOINC, "code": concept.code, "display": concept.display}],
            "text": text,
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonCode": [cmv_reason()],
        "note": [{"text": note}],
    }
    if schedule is not None:
        repeat: dict[str, Any] = {
            "frequency": schedule.frequency,
            "period": schedule.period,
            "periodUnit": schedule.period_unit,
        }
        if duration_days is not None:
            repeat["boundsDuration"] = _days(duration_days)
        request["occurrenceTiming"] = {"repeat": repeat}
    return request


def uncoded_service_request(patient_id: str, text: str, note: str) -> dict[str, Any]:
    """A draft ServiceRequest with text only, where the reference has no code for the test."""
    return {
        "resourceType": "ServiceRequest",
        "id": new_uuid(),
        "status": "draft",
        "intent": "order",
        "code": {"text": text},
        "subject": {"reference": f"Patient/{patient_id}"},
        "reasonCode": [cmv_reason()],
        "note": [{"text": note}],
    }
