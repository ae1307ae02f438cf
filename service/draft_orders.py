"""The draft orders of an order-select / order-sign context: which are selected, and are they R4.

Selected MedicationRequests are validated against the FHIR R4 JSON Schema (``service.draft_schema``).
Real clients are sloppy (the CDS Hooks sandbox sends ``category`` and ``reasonCode`` as single objects,
and the hook library's own R4 example sends ``doseAndRate`` as an object), so a single object where R4
has an array is wrapped before validation. Non-selected orders are context only: they are never validated, so a
malformed one cannot sink the request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cards.fhir_out import json_copy
from service.draft_schema import draft_schema
from service.errors import InvalidRequest
from service.validation import format_path

# R4 MedicationRequest / Dosage members that are arrays (0..*), where clients have been seen sending
# a single object. Only these are repaired; anything else that is wrong is reported.
_MEDREQ_ARRAYS = ("category", "reasonCode", "reasonReference", "dosageInstruction", "note", "identifier")
_DOSAGE_ARRAYS = ("doseAndRate", "additionalInstruction")


@dataclass(frozen=True)
class DraftOrders:
    """Selected orders (validated, normalised copies) and the other draft orders (raw, context only)."""

    selected: tuple[dict[str, Any], ...]
    others: tuple[dict[str, Any], ...]


def _wrap(resource: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        if isinstance(resource.get(name), dict):
            resource[name] = [resource[name]]


def normalise_medication_request(resource: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy with single objects wrapped where R4 has arrays."""
    fixed = json_copy(resource)  # an orjson round trip, ~6x cheaper than copy.deepcopy (cards.fhir_out)
    _wrap(fixed, _MEDREQ_ARRAYS)
    dosages = fixed.get("dosageInstruction")
    if isinstance(dosages, list):
        for dosage in dosages:
            if isinstance(dosage, dict):
                _wrap(dosage, _DOSAGE_ARRAYS)
    return fixed


def _validate_r4(resource: dict[str, Any], where: str) -> None:
    schema = draft_schema()
    if schema.is_valid(resource):
        return
    error = schema.first_error(resource)
    path, rule = error if error is not None else ([], "is invalid")
    expression = format_path(path, where)
    raise InvalidRequest(f"'{expression}' is not valid FHIR R4: it {rule}", expression=expression)


def _subject_patient_id(resource: Mapping[str, Any]) -> str | None:
    subject = resource.get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    if isinstance(reference, str) and reference.startswith("Patient/"):
        return reference.split("/", 1)[1]
    return None


def split_draft_orders(context: Mapping[str, Any], *, all_selected: bool) -> DraftOrders:
    """Resolve ``selections`` against ``draftOrders`` and validate the selected MedicationRequests."""
    entries = context["draftOrders"].get("entry") or []
    by_reference: dict[str, tuple[int, dict[str, Any]]] = {}
    for index, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and isinstance(resource.get("id"), str):
            by_reference[f"{resource['resourceType']}/{resource['id']}"] = (index, resource)

    if all_selected:
        chosen = list(by_reference)
    else:
        chosen = []
        for position, reference in enumerate(context["selections"]):
            if reference not in by_reference:
                raise InvalidRequest(
                    f"context.selections[{position}] references {reference}, which is not in context.draftOrders",
                    expression=f"context.selections[{position}]",
                )
            chosen.append(reference)

    selected: list[dict[str, Any]] = []
    for reference in dict.fromkeys(chosen):
        index, resource = by_reference[reference]
        where = f"context.draftOrders.entry[{index}].resource"
        if resource["resourceType"] == "MedicationOrder":
            raise InvalidRequest(
                f"'{where}' is a DSTU2 MedicationOrder; this service requires FHIR R4 MedicationRequest",
                expression=where,
            )
        if resource["resourceType"] != "MedicationRequest":
            continue  # selected lab, diet or imaging orders are outside this service's scope
        fixed = normalise_medication_request(resource)
        _validate_r4(fixed, where)
        patient_id = _subject_patient_id(fixed)
        if patient_id is not None and patient_id != context["patientId"]:
            raise InvalidRequest(f"'{where}.subject' is not context.patientId", expression=f"{where}.subject")
        selected.append(fixed)

    selected_refs = set(chosen)
    others = tuple(resource for ref, (_, resource) in by_reference.items() if ref not in selected_refs)
    return DraftOrders(selected=tuple(selected), others=others)
